"""DVC stage `pretrain_xl_clip`: a vision tower for the tiny-world SDXL's second text encoder (frozen by default)."""

from pathlib import Path

from sdpipe.stage import run_stage
from sdpipe.tinyworld.pretrain_xl import pretrain_xl_clip


def main(params) -> None:
    pretrain_xl_clip(
        params.pretrain,
        params.pretrain_xl,
        seed=params.base.seed,
        xl_base=Path(params.paths.pretrain_xl),
        out_dir=Path(params.paths.pretrain_xl_clip),
        metrics_path=Path(params.paths.pretrain_xl_clip_metrics),
    )


if __name__ == "__main__":
    run_stage("pretrain_xl_clip", main)
