"""`pretrain`: placeholder until the stage is built."""

from sdpipe.config.section import Section


class PretrainParams(Section):
    pass
