"""DVC stage `pretrain_xl`: trains the tiny-world SDXL on top of the SD base (frozen by default)."""

from pathlib import Path

from sdpipe.stage import run_stage
from sdpipe.tinyworld.pretrain_xl import pretrain_xl

WORK_DIR = Path(".sdpipe/work/pretrain_xl")  # finished phases, for resuming an interrupted run (git-ignored)


def main(params) -> None:
    pretrain_xl(
        params.pretrain,
        params.pretrain_xl,
        seed=params.base.seed,
        sd_base=Path(params.paths.pretrain),
        out_dir=Path(params.paths.pretrain_xl),
        work_dir=WORK_DIR,
        metrics_path=Path(params.paths.pretrain_xl_metrics),
    )


if __name__ == "__main__":
    run_stage("pretrain_xl", main)
