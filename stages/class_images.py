"""DVC stage `class_images`: generate DreamBooth's prior-preservation class images with the base model."""

from pathlib import Path

from sdpipe.class_images import write_class_images
from sdpipe.stage import run_stage


def main(params) -> None:
    write_class_images(
        out_dir=Path(params.paths.class_images),
        settings=params.train.dreambooth.class_images,
        base=params.base,
        encode=params.encode,
    )


if __name__ == "__main__":
    run_stage("class_images", main)
