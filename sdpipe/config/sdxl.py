"""`sdxl`: the second base model, of the SDXL family, that the pipeline builds and scores beside `base.base_model`
(when `base.extra_families` lists `sdxl`). Its stages (`encode_family@sdxl`, `class_images_family@sdxl`,
`train_family@sdxl-<method>`, `evaluate_base_family@sdxl`, `evaluate_family@sdxl-<method>`) run the same code as the
main ones on a view of the params (`family_view`): this base, these methods, outputs under
`<paths.families>/sdxl/`, scoreboard rows `sdxl-<model>`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from sdpipe.config.merge import MergeParams
from sdpipe.config.section import Section
from sdpipe.methods.registry import METHODS

SDXL_METHODS = tuple(name for name, method in METHODS.items() if "sdxl" in method.families)


class SdxlParams(Section):
    base_model: str = "artifacts/pretrain/tinyworld_xl"
    """The SDXL model to customize: a diffusers SDXL folder, an SDXL single file (with `base_model_config`) or a hub id."""

    base_model_config: str | None = None
    """For a single-file checkpoint: a local SDXL diffusers folder describing its architecture."""

    methods: list[Literal[SDXL_METHODS]] = Field(default_factory=lambda: list(SDXL_METHODS))  # type: ignore[valid-type]
    """The methods trained (and scored) on it, with the settings of their `train.<method>` sections (changed by
    `train` below): those that train SDXL so far."""

    train: dict[Literal[SDXL_METHODS], dict[str, Any]] = Field(default_factory=dict)  # type: ignore[valid-type]
    """Settings of `train.<method>` that differ on this base, by method (`lora: {max_steps: 1000}`); every other
    setting is `train.<method>`'s. Checked as `train.<method>` is."""

    merge: MergeParams = Field(default_factory=MergeParams)
    """Merge recipes of this family's models (the `merge` section's recipes, for SDXL): `base` is this section's
    base_model and `train:<method>` one of its trained models; `merge_family@sdxl` runs them into
    `<paths.families>/sdxl/merge/<recipe>/`, `evaluate_merge_family@sdxl-<recipe>` scores each as the row
    `sdxl-merge-<recipe>`. Block weights are SDXL's list (20: BASE, IN00-IN08, M00, OUT00-OUT08)."""

    export_model: str = Field(default="base", pattern=r"^(base|train:[A-Za-z0-9_]+)$")
    """What `export_family@sdxl` exports to ONNX (with the `export` section's other settings), in optimum's SDXL layout
    under `<paths.families>/sdxl/export/onnx/<name>/`: `base` (this section's base_model) or `train:<method>` (one of
    `methods`). `export.enabled: false` skips it too."""

    @model_validator(mode="after")
    def _export_model_is_trained(self) -> "SdxlParams":
        method = self.export_model.removeprefix("train:")
        if self.export_model != "base" and method not in self.methods:
            raise ValueError(f"export_model is {self.export_model!r} but {method!r} is not in methods ({self.methods})")
        return self


def family_train(params, family: str):
    """`params.train` as an extra family's stages see it: its methods, each with `family_settings`."""
    section = getattr(params, family)
    updates = {method: family_settings(params, family, method) for method in section.train}
    return params.train.model_copy(update={"methods": list(section.methods), **updates})


def family_settings(params, family: str, method: str):
    """`train.<method>` with the family's changes (`<family>.train.<method>`) merged in and validated (a
    `pydantic.ValidationError` located in the changes)."""
    settings = getattr(params.train, method)
    changes = getattr(params, family).train.get(method, {})
    return type(settings).model_validate(merged(settings.model_dump(), changes))


def merged(settings: dict, changes: dict) -> dict:
    """`settings` with `changes` laid over it; a nested section (`class_images`) is changed key by key."""
    result = dict(settings)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(settings.get(key), dict)
        result[key] = merged(settings[key], value) if both_sections else value
    return result


def family_view(params, family: str):
    """The params as the stages of an extra family see them: that family's base model, methods and merge recipes, and
    its latents, class images, trained and merged models under `<paths.families>/<family>/` (its evaluation rows go to
    `<paths.eval>/models/<family>-<model>/`, beside the main ones, scored by the main base's CLIP unless
    `evaluate.clip_model` names one)."""
    section = getattr(params, family)
    root = Path(params.paths.families) / family
    paths = params.paths.model_copy(
        update={
            "latents": str(root / "latents"),
            "class_images": str(root / "class_images"),
            "train": str(root / "train"),
            "merge": str(root / "merge"),
            "export": str(root / "export"),
            "checkpoints": None if params.paths.checkpoints is None else str(Path(params.paths.checkpoints) / family),
        }
    )
    base = params.base.model_copy(update={"base_model": section.base_model, "base_model_config": section.base_model_config})
    train = family_train(params, family)
    merge = section.merge
    export = params.export.model_copy(update={"model": section.export_model})
    evaluate = params.evaluate
    main_clip = Path(params.base.base_model) / "clip"
    if evaluate.clip_model is None and (main_clip / "config.json").is_file():
        # the CLIP beside the main base scores this family's rows too, so that the families' CLIP metrics compare
        evaluate = evaluate.model_copy(update={"clip_model": str(main_clip)})
    update = {"paths": paths, "base": base, "train": train, "merge": merge, "evaluate": evaluate, "export": export}
    return params.model_copy(update=update)


