"""Typed, validated params: one pydantic model per `params.yaml` section.

`load_params("params.yaml")` returns a `Params` or raises `ParamsError`, whose message lists every problem
with its YAML path (`train.lora.rank: Input should be a valid integer`). Besides each section's own checks, a key
written twice, a boolean where a number belongs, and names that must agree between sections (a method's datasets
are in `base.datasets`) are errors.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Union, get_args, get_origin

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
from sdpipe.config.pretrain import PretrainParams, PretrainXLParams
from sdpipe.config.sdxl import SdxlParams, family_settings
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
    pretrain_xl: PretrainXLParams = Field(default_factory=PretrainXLParams)
    """The tiny-world SDXL base model recipe (the frozen `pretrain_xl` stage)."""
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
    sdxl: SdxlParams = Field(default_factory=SdxlParams)
    """The SDXL base built and scored beside `base.base_model` when `base.extra_families` lists `sdxl`."""


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
        elif item["type"] == "model_type":
            message = f"expected a mapping of keys (this is a section), got {yaml_kind(item['input'])}"
        problems.append(f"{path}: {message}")
    return problems


def yaml_kind(value: object) -> str:
    """What a parsed YAML value is, in YAML's words."""
    kinds = {type(None): "null (nothing)", bool: "a boolean", int: "a number", float: "a number", str: "text"}
    return kinds.get(type(value), "a list" if isinstance(value, list) else type(value).__name__)


def booleans_for_numbers(model: type[Section], data: dict, prefix: str = "") -> list[str]:
    """Number fields given a boolean: YAML reads `yes`, `on` and `true` as booleans, which pydantic would quietly
    take as the number 1."""
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        accepted = top_level_types(field.annotation)
        if isinstance(value, bool) and bool not in accepted and accepted & {int, float}:
            problems.append(f"{prefix}{key}: expected a number, got a boolean ({str(value).lower()})")
        sections = [kind for kind in accepted if isinstance(kind, type) and issubclass(kind, Section)]
        if isinstance(value, dict) and len(sections) == 1:
            problems += booleans_for_numbers(sections[0], value, f"{prefix}{key}.")
    return problems


def top_level_types(annotation: object) -> set:
    """The types a field annotation accepts at its top level: `float | None` → {float, NoneType}."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return top_level_types(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(top_level_types(arg) for arg in get_args(annotation)))
    return {origin or annotation}


def cross_section_problems(params: Params) -> list[str]:
    """What no section can check alone: dataset names that must agree between sections."""
    datasets = params.base.datasets
    listed = ", ".join(datasets)
    problems = [f"base.datasets: {name} is listed twice" for name in sorted(set(datasets)) if datasets.count(name) > 1]
    extra_methods = params.sdxl.methods if "sdxl" in params.base.extra_families else []
    chosen_datasets = {}  # the YAML path of each `datasets` setting a trained method uses -> its value
    for method in dict.fromkeys([*params.train.methods, *extra_methods]):
        chosen_datasets[f"train.{method}.datasets"] = getattr(getattr(params.train, method), "datasets", None)
    for family in params.base.extra_families:
        for method, changes in getattr(params, family).train.items():
            try:
                settings = family_settings(params, family, method)
            except ValidationError as error:
                problems += [f"{family}.train.{method}.{line}" for line in format_validation_error(error)]
                continue
            problems += booleans_for_numbers(type(settings), changes, f"{family}.train.{method}.")
            if "datasets" in changes:
                chosen_datasets[f"{family}.train.{method}.datasets"] = settings.datasets
    for key, chosen in chosen_datasets.items():  # None: all of base.datasets
        if chosen is not None and not chosen:
            problems.append(f"{key}: empty; list datasets of base.datasets, or null for all of them")
        unknown = [name for name in chosen or [] if name not in datasets]
        if unknown:
            problems.append(
                f"{key}: {', '.join(unknown)} not in base.datasets ({listed}); only the datasets "
                "of base.datasets are prepared, captioned and encoded"
            )
    return problems


def parse_params(data: object, source: str = "params") -> Params:
    """Validates an already-parsed params mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(source, [f"<root>: expected a mapping of sections, got {type(data).__name__}"])
    problems = booleans_for_numbers(Params, data)
    try:
        params = Params.model_validate(data)
    except ValidationError as error:
        raise ParamsError(source, problems + format_validation_error(error)) from None
    problems += cross_section_problems(params)
    if problems:
        raise ParamsError(source, problems)
    return params


class UniqueKeyLoader(yaml.SafeLoader):
    """The safe YAML loader, refusing a key written twice in one mapping (PyYAML would keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the safe loader refuses it itself
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates a params file; raises `ParamsError` naming the file and every bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(str(path), ["<file>: no such file"]) from None
    except UnicodeDecodeError as error:
        raise ParamsError(str(path), [f"<file>: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    except OSError as error:  # a folder, no permission, ...
        raise ParamsError(str(path), [f"<file>: cannot be read ({error.strerror or error})"]) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ParamsError(str(path), [f"<file>: not valid YAML: {error}"]) from None
    return parse_params(data, str(path))
