"""Errors meant for the user: the stage prints the message (no traceback) and exits non-zero."""


class SdpipeError(Exception):
    """A problem with the user's input (params, dataset, model file) explained in the message.

    Messages name the file or the params key at fault and say what was expected.
    """
