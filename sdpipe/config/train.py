"""`train`: placeholder until the stage is built."""

from sdpipe.config.section import Section


class TrainParams(Section):
    pass
