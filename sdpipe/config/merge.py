"""`merge`: placeholder until the stage is built."""

from sdpipe.config.section import Section


class MergeParams(Section):
    pass
