"""DVC stage `prepare`: check, orient, convert and resize each dataset's images, and write its manifest."""

from pathlib import Path

from sdpipe.data.prepare import prepare_dataset
from sdpipe.stage import run_stage


def main(params) -> None:
    for name in params.base.datasets:
        prepare_dataset(
            dataset_dir=Path(params.paths.datasets) / name,
            out_dir=Path(params.paths.prepared) / name,
            resolution=params.base.resolution,
            params=params.prepare,
        )


if __name__ == "__main__":
    run_stage("prepare", main)
