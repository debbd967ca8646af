"""Typed, validated params: one pydantic model per `params.yaml` section.

`load_params("params.yaml")` returns a `Params` or raises `ParamsError`, whose message lists every problem
with its YAML path (`train.lora.rank: Input should be a valid integer`).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from sdpipe.config.base import BaseParams
from sdpipe.config.caption import CaptionParams
from sdpipe.config.encode import EncodeParams
from sdpipe.config.evaluate import EvaluateParams
from sdpipe.config.export import ExportParams
from sdpipe.config.merge import MergeParams
from sdpipe.config.paths import PathsParams
from sdpipe.config.prepare import PrepareParams
from sdpipe.config.pretrain import PretrainParams
from sdpipe.config.section import Section
from sdpipe.config.train import TrainParams

__all__ = ["Params", "ParamsError", "load_params", "Section"]


class Params(Section):
    """The whole `params.yaml`."""

    paths: PathsParams = Field(default_factory=PathsParams)
    """Where each stage reads and writes (interpolated into dvc.yaml)."""
    base: BaseParams = Field(default_factory=BaseParams)
    """Shared by every stage: base model, seed, device, precision, resolution, datasets."""
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    """The tiny-world base model recipe (the frozen `pretrain` stage)."""
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    """Reading, cleaning and resizing the images of each dataset."""
    caption: CaptionParams = Field(default_factory=CaptionParams)
    """Filling in missing captions."""
    encode: EncodeParams = Field(default_factory=EncodeParams)
    """Caching VAE latents."""
    train: TrainParams = Field(default_factory=TrainParams)
    """The training methods and their settings, one subsection per method."""
    merge: MergeParams = Field(default_factory=MergeParams)
    """Checkpoint merge recipes."""
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    """Sampling and scoring every model."""
    export: ExportParams = Field(default_factory=ExportParams)
    """ONNX export."""


class ParamsError(ValueError):
    """A params file that cannot be used; the message names each bad key by its YAML path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid params\n" + "\n".join(f"  {p}" for p in problems))


def format_validation_error(error: ValidationError) -> list[str]:
    """Turns pydantic's errors into `dotted.yaml.path: message` lines."""
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not a field of this section; check the spelling)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(f"{path}: {message}")
    return problems


def parse_params(data: object, source: str = "params") -> Params:
    """Validates an already-parsed params mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(source, [f"<root>: expected a mapping of sections, got {type(data).__name__}"])
    try:
        return Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(source, format_validation_error(error)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates a params file; raises `ParamsError` naming the file and every bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(str(path), ["<file>: no such file"]) from None
    except UnicodeDecodeError as error:
        raise ParamsError(str(path), [f"<file>: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(str(path), [f"<file>: not valid YAML: {error}"]) from None
    return parse_params(data, str(path))
