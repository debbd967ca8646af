"""`sdxl`: the second base model, of the SDXL family, that the pipeline builds and scores beside `base.base_model`
(when `base.extra_families` lists `sdxl`). Its stages (`encode_family@sdxl`, `class_images_family@sdxl`,
`train_family@sdxl-<method>`, `evaluate_base_family@sdxl`, `evaluate_family@sdxl-<method>`) run the same code as the
main ones on a view of the params (`family_view`): this base, these methods, outputs under
`<paths.families>/sdxl/`, scoreboard rows `sdxl-<model>`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from sdpipe.config.section import Section
from sdpipe.methods.registry import METHODS

SDXL_METHODS = tuple(name for name, method in METHODS.items() if "sdxl" in method.families)


class SdxlParams(Section):
    base_model: str = "artifacts/pretrain/tinyworld_xl"
    """The SDXL model to customize: a diffusers SDXL folder, an SDXL single file (with `base_model_config`) or a hub id."""

    base_model_config: str | None = None
    """For a single-file checkpoint: a local SDXL diffusers folder describing its architecture."""

    methods: list[Literal[SDXL_METHODS]] = Field(default_factory=lambda: list(SDXL_METHODS))  # type: ignore[valid-type]
    """The methods trained (and scored) on it, with the settings of their `train.<method>` sections: those that train
    SDXL so far."""


def family_view(params, family: str):
    """The params as the stages of an extra family see them: that family's base model and methods, no merges, and
    its latents, class images and trained models under `<paths.families>/<family>/` (its evaluation rows go to
    `<paths.eval>/models/<family>-<model>/`, beside the main ones)."""
    section = getattr(params, family)
    root = Path(params.paths.families) / family
    paths = params.paths.model_copy(
        update={
            "latents": str(root / "latents"),
            "class_images": str(root / "class_images"),
            "train": str(root / "train"),
            "checkpoints": None if params.paths.checkpoints is None else str(Path(params.paths.checkpoints) / family),
        }
    )
    base = params.base.model_copy(update={"base_model": section.base_model, "base_model_config": section.base_model_config})
    train = params.train.model_copy(update={"methods": list(section.methods)})
    merge = params.merge.model_copy(update={"recipes": {}})  # merges of other families: not yet (issue #22)
    return params.model_copy(update={"paths": paths, "base": base, "train": train, "merge": merge})


