"""Model families and how a base model's family is found: see `base.ModelFamily`."""

from __future__ import annotations

import json
from pathlib import Path

from sdpipe.errors import SdpipeError
from sdpipe.families.base import Conditioning, ModelFamily
from sdpipe.families.sd import SD
from sdpipe.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD, SDXL)}
SINGLE_FILE_MARKERS = {"conditioner.embedders.": SDXL}  # a key prefix only that family's checkpoints have

__all__ = [
    "FAMILIES", "SD", "SDXL", "Conditioning", "ModelFamily", "family_of_class", "folder_class_name", "folder_family",
    "pipeline_family", "single_file_family",
]


def family_of_class(class_name: str) -> ModelFamily | None:
    """The family whose folders a `model_index.json` `_class_name` names, or None."""
    return next((family for family in FAMILIES.values() if class_name in family.folder_classes), None)


def folder_class_name(folder: str | Path) -> str:
    """The pipeline class a diffusers folder's `model_index.json` names; raises OSError, ValueError, KeyError or
    TypeError when it cannot be read."""
    return json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]


def folder_family(folder: str | Path, *, key: str = "base.base_model") -> ModelFamily:
    """The family of a diffusers folder, from its `model_index.json`."""
    index_path = Path(folder) / "model_index.json"
    try:
        class_name = folder_class_name(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SdpipeError(f"{key}: cannot read the pipeline class from {index_path} ({error})") from error
    family = family_of_class(class_name)
    if family is not None:
        return family
    known = ", ".join(f"{family.pipeline_class} ({family.title})" for family in FAMILIES.values())
    raise SdpipeError(f"{key}: {index_path} is a {class_name} folder; sdpipe reads {known}")


def single_file_family(keys) -> ModelFamily:
    """The family of a single-file checkpoint, from its tensor names."""
    for prefix, family in SINGLE_FILE_MARKERS.items():
        if any(name.startswith(prefix) for name in keys):
            return family
    return SD


def pipeline_family(pipeline) -> ModelFamily:
    """The family of a loaded pipeline, or of a method's subclass of a family's pipeline class."""
    import diffusers

    for family in FAMILIES.values():
        if isinstance(pipeline, getattr(diffusers, family.pipeline_class)):
            return family
    raise SdpipeError(f"a {type(pipeline).__name__} is not a pipeline of {', '.join(FAMILIES)}")
