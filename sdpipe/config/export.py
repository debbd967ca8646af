"""`export`: placeholder until the stage is built."""

from sdpipe.config.section import Section


class ExportParams(Section):
    pass
