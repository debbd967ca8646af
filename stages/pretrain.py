"""DVC stage `pretrain`: trains the tiny-world Stable Diffusion from scratch (frozen by default)."""

from pathlib import Path

from sdpipe.stage import run_stage
from sdpipe.tinyworld.pretrain import pretrain

WORK_DIR = Path(".sdpipe/work/pretrain")  # finished phases, for resuming an interrupted run (git-ignored)


def main(params) -> None:
    pretrain(
        params.pretrain,
        seed=params.base.seed,
        out_dir=Path(params.paths.pretrain),
        variations_dir=Path(params.paths.pretrain_variations),
        work_dir=WORK_DIR,
        metrics_path=Path(params.paths.pretrain_metrics),
    )


if __name__ == "__main__":
    run_stage("pretrain", main)
