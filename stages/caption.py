"""DVC stage `caption`: keep each dataset's own captions and fill in the missing ones."""

from pathlib import Path

from sdpipe.data.captions import caption_dataset
from sdpipe.stage import run_stage


def main(params) -> None:
    for name in params.base.datasets:
        caption_dataset(
            manifest_path=Path(params.paths.prepared) / name / "manifest.jsonl",
            out_path=Path(params.paths.captions) / f"{name}.jsonl",
            params=params.caption,
            device=params.base.device,
        )


if __name__ == "__main__":
    run_stage("caption", main)
