"""Running one merge recipe into `<paths.merge>/<recipe>/`: `model/`, `model.safetensors` and `recipe.json`
(`lora.safetensors` and `recipe.json` for the recipes that write a LoRA: `lora_extract`, `lora_resize`).

    inputs = resolve_inputs(recipe, base_model=..., train_dir=...)
    config = architecture_folder(recipe, inputs, base_model=..., base_model_config=...)
    merge_recipe(recipe, inputs, config_folder=config, out_dir=..., seed=...)

`merge_recipe` opens every input (`sdpipe.merge.sources`), checks that they have the same keys and shapes
(the error names the first key that differs) and that the architecture folder fits them, then computes the
merge key by key in fp32 (`sdpipe.merge.methods`), writing each merged tensor to the single file as soon as
it is computed (`sdpipe.merge.output`). Peak memory is a few tensors, not a model. The diffusers folder is
written from the single file, and `recipe.json` records the recipe and the sha256 of every input file. The
recipe folder is written atomically: a failing recipe leaves no partial output and the old one, if any, as it was.

`lora_bake` is such a merge of one model, its merger (`sdpipe.merge.lora.LoraBaker`) adding the LoRAs' updates;
`lora_extract` and `lora_resize` go to `write_lora_recipe`, which writes a kohya LoRA instead of a model.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.config.merge import LORA_FILE_METHODS, LoraBakeInputs, TaskVectorInputs
from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, folder_family, single_file_family
from sdpipe.formats.kohya import SDXL_BASE_MODEL_VERSION, save_kohya_lora
from sdpipe.io import atomic_path, write_json
from sdpipe.merge import methods
from sdpipe.merge.blocks import BlockWeight
from sdpipe.merge.lora import (
    LORA_FILE,
    LoraBaker,
    LoraFile,
    extract_lora,
    load_lora,
    lora_family,
    lora_metadata,
    model_layers,
    resize_lora,
    resolve_lora_source,
)
from sdpipe.merge.output import (
    DTYPES_BY_NAME,
    SafetensorsWriter,
    check_fits,
    diffusers_layout,
    write_diffusers_folder,
)
from sdpipe.merge.sources import Checkpoint, model_path, open_checkpoint, resolve_source
from sdpipe.models.loading import file_sha256
from sdpipe.models.saving import save_pipeline
from sdpipe.models.single_file import DTYPES, OPEN_CLIP_PREFIX, load_single_file_pipeline
from sdpipe.progress import log, track


@dataclass(frozen=True)
class MergeInput:
    """One input of a recipe: its role (`a`, `base`, `models[1]`, `loras[0]`, ...), the source as written, its path,
    and whether it is a LoRA file rather than a model."""

    role: str
    source: str
    path: Path
    is_lora: bool = False


def recipe_key(recipe) -> str:
    return f"merge.recipes.{recipe.name}"


def input_roles(recipe) -> list[tuple[str, str, bool]]:
    """(role, source, is a LoRA) of each input of a recipe, in the recipe's order."""
    inputs = recipe.inputs
    if isinstance(inputs, TaskVectorInputs):
        roles = [("base", inputs.base)] + [(f"models[{index}]", source) for index, source in enumerate(inputs.models)]
        roles += [("target", inputs.target)] if inputs.target is not None else []
        return [(role, source, False) for role, source in roles]
    if isinstance(inputs, LoraBakeInputs):
        loras = [(f"loras[{index}]", source, True) for index, source in enumerate(inputs.loras)]
        return [("model", inputs.model, False), *loras]
    if recipe.method == "lora_resize":
        return [("lora", inputs.lora, True)]
    return [(role, getattr(inputs, role), False) for role in type(inputs).model_fields]


def resolve_inputs(recipe, *, base_model: str, train_dir: str | Path) -> list[MergeInput]:
    """The folder or file of each input (`base` is `base_model`, `train:<method>` is under `train_dir`)."""
    inputs = []
    for role, source, is_lora in input_roles(recipe):
        key = f"{recipe_key(recipe)}.inputs.{role}"
        if is_lora:
            path = resolve_lora_source(source, train_dir=train_dir, key=key)
        else:
            path = resolve_source(source, base_model=base_model, train_dir=train_dir, key=key)
        inputs.append(MergeInput(role, source, path, is_lora))
    return inputs


def architecture_folder(recipe, inputs: list[MergeInput], *, base_model: str, base_model_config: str | None) -> Path:
    """The diffusers folder whose configs, tokenizer and scheduler the output gets: the recipe's `config`, else the
    first input that is a diffusers folder, else the base model's folder (or `base.base_model_config`)."""
    if recipe.config is not None:
        folder = Path(recipe.config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise SdpipeError(
                f"{recipe_key(recipe)}.config {recipe.config!r}: expected a local diffusers folder (model_index.json)"
            )
        return folder
    for item in inputs:
        if item.path.is_dir():
            return item.path
    base = model_path(base_model, "base.base_model")
    if base.is_dir():
        return base
    if base_model_config is not None:
        return Path(base_model_config).expanduser()
    raise SdpipeError(
        f"{recipe_key(recipe)}: every input is a single file and so is base.base_model, so nothing describes the "
        f"architecture of the diffusers folder to write; set {recipe_key(recipe)}.config to a local diffusers folder"
    )


def merge_recipe(recipe, inputs: list[MergeInput], *, config_folder: Path, out_dir: Path, seed: int) -> Path:
    """Merges `inputs` by `recipe` into `out_dir` (`model/`, `model.safetensors`, `recipe.json`); returns it.

    `config_folder` is the architecture's diffusers folder (`architecture_folder`); `seed` is used by DARE when
    the recipe has no seed of its own. `lora_extract` and `lora_resize` write a LoRA instead (`write_lora_recipe`).
    """
    key = recipe_key(recipe)
    out_dir = Path(out_dir)
    if recipe.method in LORA_FILE_METHODS:
        return write_lora_recipe(recipe, inputs, config_folder=config_folder, out_dir=out_dir)
    models = [item for item in inputs if not item.is_lora]
    with contextlib.ExitStack() as stack:
        checkpoints = {
            item.role: stack.enter_context(open_checkpoint(item.path, f"{key}.inputs.{item.role}")) for item in models
        }
        loras = [load_lora(item.role, item.source, item.path, key) for item in inputs if item.is_lora]
        check_one_family(inputs, checkpoints, loras, config_folder, key)
        check_same_architecture(models, checkpoints, key)
        first = checkpoints[models[0].role]
        keys = sorted(first.tensors)
        open_clip = any(name.startswith(OPEN_CLIP_PREFIX) for name in keys)
        layout = None
        if not open_clip:  # an SD 2.x text encoder: the diffusers folder is converted by diffusers instead
            layout = diffusers_layout(config_folder, f"{key}.config")
            check_fits(layout, {name: first.tensors[name].shape for name in keys}, config_folder, key)
        if recipe.method == "lora_bake":
            merger = lora_baker(recipe, models[0], first, loras, config_folder, key)
        else:
            merger = Merger(recipe, keys, seed)
            merger.prepare(checkpoints, keys)

        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            single_file = tmp / "model.safetensors"
            write_merged_file(single_file, merger, checkpoints, first, keys, DTYPES[recipe.dtype])
            if layout is None:
                pipeline = load_single_file_pipeline(single_file, config_folder, torch_dtype=DTYPES[recipe.dtype])
                save_pipeline(pipeline, tmp / "model")
            else:
                with open_checkpoint(single_file, key) as merged:
                    write_diffusers_folder(merged, layout, config_folder, tmp / "model")
            record = recipe_record(recipe, inputs, checkpoints, config_folder, merger.seed)
            if isinstance(merger, LoraBaker):
                record["baked_layers"] = merger.layer_counts()
            write_json(tmp / "recipe.json", record)
    log(f"merge: {recipe.name} -> {out_dir}")
    return out_dir


def lora_baker(
    recipe, model: MergeInput, checkpoint: Checkpoint, loras: list[LoraFile], config_folder: Path, key: str
) -> LoraBaker:
    """The merger of a `lora_bake` recipe: each layer of its LoRA files matched to a weight of the model (a LoRA
    for another family matches none: the error says so)."""
    strengths = recipe.strength if isinstance(recipe.strength, list) else [recipe.strength] * len(loras)
    layers = model_layers(config_folder, f"{key}.config")
    try:
        return LoraBaker(recipe, loras, strengths, layers, set(checkpoint.tensors), key)
    except SdpipeError as error:
        for lora in loras:
            if lora_family(lora) is not checkpoint.family:
                raise SdpipeError(
                    f"{error}: inputs.{lora.role} is a {lora_family(lora).title} LoRA and inputs.{model.role} "
                    f"({model.source}: {model.path}) is {checkpoint.family.title}"
                ) from None
        raise


def write_lora_recipe(recipe, inputs: list[MergeInput], *, config_folder: Path, out_dir: Path) -> Path:
    """Runs `lora_extract` or `lora_resize` into `out_dir` (`lora.safetensors` in kohya format, `recipe.json` with
    each layer's rank and retained norm share); returns it. Written atomically, like a merge.

    Extracting from two models that differ in no layer is an error (an empty LoRA is never what was meant).
    """
    key = recipe_key(recipe)
    layers = model_layers(config_folder, f"{key}.config")
    conv_rank = recipe.rank if recipe.conv_rank is None else recipe.conv_rank
    dtype = DTYPES[recipe.dtype]
    with contextlib.ExitStack() as stack:
        checkpoints = {
            item.role: stack.enter_context(open_checkpoint(item.path, f"{key}.inputs.{item.role}"))
            for item in inputs
            if not item.is_lora
        }
        loras = [load_lora(item.role, item.source, item.path, key) for item in inputs if item.is_lora]
        check_one_family(inputs, checkpoints, loras, config_folder, key)
        if recipe.method == "lora_extract":
            check_same_architecture(inputs, checkpoints, key)
            tuned, base = checkpoints["tuned"], checkpoints["base"]
            if not any(name.startswith(OPEN_CLIP_PREFIX) for name in tuned.tensors):
                shapes = {name: stored.shape for name, stored in tuned.tensors.items()}
                check_fits(diffusers_layout(config_folder, f"{key}.config"), shapes, config_folder, key)
            present = extract_layers(layers, tuned, config_folder, key)
            tensors, report = extract_lora(
                tuned.read,
                base.read,
                present,
                rank=recipe.rank,
                conv_rank=conv_rank,
                min_diff=recipe.min_diff,
                dtype=dtype,
            )
            if not tensors:
                tuned_input, base_input = inputs
                raise SdpipeError(
                    f"{key}: inputs.tuned ({tuned_input.source}: {tuned_input.path}) and inputs.base "
                    f"({base_input.source}: {base_input.path}) differ in no linear or conv layer of the UNet or text "
                    f"encoder (by more than min_diff={recipe.min_diff}"
                    f"{', with conv_rank 0' if conv_rank == 0 else ''}): there is nothing to extract"
                )
            base_metadata = {"ss_base_model_version": SDXL_BASE_MODEL_VERSION} if tuned.family is SDXL else {}
        else:
            (lora,) = loras
            tensors, report = resize_lora(lora, layers, rank=recipe.rank, conv_rank=conv_rank, dtype=dtype, key=key)
            if not tensors:
                raise SdpipeError(f"{lora.where(key)}: conv_rank 0 leaves out every layer of the LoRA")
            base_metadata = lora.metadata
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            save_kohya_lora(tensors, tmp / LORA_FILE, lora_metadata(recipe, report, layers, base_metadata))
            record = recipe_record(recipe, inputs, checkpoints, config_folder, seed=None)
            record["layers"] = report
            write_json(tmp / "recipe.json", record)
    log(f"merge: {recipe.name} -> {out_dir / LORA_FILE} ({len(report)} layers)")
    return out_dir


def extract_layers(layers: dict, checkpoint: Checkpoint, config_folder: Path, key: str) -> dict:
    """The layers of the architecture that `checkpoint` has (an SD 2.x OpenCLIP text encoder is not under the
    CLIP keys: it is left out); a layer whose weight has another size is an error."""
    present = {}
    for name, layer in layers.items():
        stored = checkpoint.tensors.get(layer.key)
        if stored is None:
            continue
        if math.prod(stored.shape) != math.prod(layer.shape) * layer.parts:
            raise SdpipeError(
                f"{key}: the inputs do not fit the architecture of {config_folder}: {layer.key!r} is "
                f"{list(stored.shape)} in the inputs and {list(layer.shape)} there; set {key}.config to a diffusers "
                "folder of the inputs' architecture"
            )
        present[name] = layer
    if any(name.startswith(OPEN_CLIP_PREFIX) for name in checkpoint.tensors):
        log(f"{key}: the SD 2.x OpenCLIP text encoder is not extracted (only CLIP text encoders are); the UNet is")
    return present


def check_one_family(
    inputs: list[MergeInput],
    checkpoints: dict[str, Checkpoint],
    loras: list[LoraFile],
    config_folder: Path,
    key: str,
) -> None:
    """Every model input and the architecture folder must be of one model family (SD 1.x/2.x, SDXL), and so must the
    LoRA of `lora_resize`: the error names the first input of another family than the first one's, or the
    architecture folder, and both families. (`lora_baker` names the family of a LoRA whose layers the model lacks.)"""
    models = [item for item in inputs if item.role in checkpoints]
    first = models[0] if models else inputs[0]
    family = checkpoints[first.role].family if models else lora_family(loras[0])
    for item in models[1:]:
        other = checkpoints[item.role].family
        if other is not family:
            raise SdpipeError(
                f"{key}: the inputs are of different model families: inputs.{first.role} ({first.source}: "
                f"{first.path}) is {family.title} and inputs.{item.role} ({item.source}: {item.path}) is "
                f"{other.title}; a recipe merges models of one family"
            )
    config_family = folder_family(config_folder, key=f"{key}.config")
    if config_family is not family:
        what = "models" if models else "LoRA"
        raise SdpipeError(
            f"{key}: the inputs are {family.title} {what} (inputs.{first.role}: {first.path}) but the architecture "
            f"folder {config_folder} is {config_family.title}; set {key}.config to a diffusers folder of the inputs' "
            "architecture"
        )


def check_same_architecture(inputs: list[MergeInput], checkpoints: dict[str, Checkpoint], key: str) -> None:
    """Every input must have the first one's keys and shapes; the error names the first key that differs."""
    first = inputs[0]
    reference = checkpoints[first.role].tensors
    for item in inputs[1:]:
        other = checkpoints[item.role].tensors
        for name in sorted(set(reference) | set(other)):
            if name not in other or name not in reference:
                has, lacks = (first, item) if name not in other else (item, first)
                raise SdpipeError(
                    f"{key}: the inputs have different architectures: {name!r} is in inputs.{has.role} "
                    f"({has.source}: {has.path}) but not in inputs.{lacks.role} ({lacks.source}: {lacks.path})"
                )
            if reference[name].shape != other[name].shape:
                raise SdpipeError(
                    f"{key}: the inputs have different architectures: {name!r} is {list(reference[name].shape)} in "
                    f"inputs.{first.role} ({first.source}: {first.path}) but {list(other[name].shape)} in "
                    f"inputs.{item.role} ({item.source}: {item.path})"
                )


def write_merged_file(
    path: Path,
    merger: Merger,
    checkpoints: dict[str, Checkpoint],
    first: Checkpoint,
    keys: list[str],
    dtype: torch.dtype,
) -> None:
    """The original-layout single file, each tensor written as soon as it is merged. Floating-point tensors are
    merged in fp32 and stored in `dtype`; any other tensor is copied from the first input."""
    layout = {
        name: (
            first.tensors[name].shape,
            dtype if first.tensors[name].is_float else DTYPES_BY_NAME[first.tensors[name].dtype],
        )
        for name in keys
    }
    recipe = json.dumps(merger.recipe.model_dump(mode="json"), sort_keys=True)
    with SafetensorsWriter(path, layout, {"format": "pt", "sdpipe_merge_recipe": recipe}) as writer:
        for name in track(writer.order, f"merge {merger.recipe.name}"):
            if not first.tensors[name].is_float:
                writer.write(name, first.read(name))
                continue
            tensors = {role: checkpoint.read(name).float() for role, checkpoint in checkpoints.items()}
            writer.write(name, merger(name, tensors).to(dtype))


class Merger:
    """Merges one key's input tensors (fp32, by role) the way the recipe says."""

    def __init__(self, recipe, keys: list[str], seed: int):
        self.recipe = recipe
        self.seed = getattr(recipe, "seed", None)
        if self.seed is None:
            self.seed = seed
        self.weights: dict[str, BlockWeight] = {}
        family = single_file_family(keys)
        for name in ("alpha", "beta"):
            if hasattr(recipe, name):
                weight = BlockWeight(getattr(recipe, name), f"{recipe_key(recipe)}.{name}", family.name)
                unused = weight.check_blocks(keys)
                if unused:
                    log(f"{recipe_key(recipe)}.{name}: the model has no {', '.join(unused)}; those weights go unused")
                self.weights[name] = weight
        self.similarities: dict[str, float] = {}
        self.similarity_range = (0.0, 1.0)

    def prepare(self, checkpoints: dict[str, Checkpoint], keys: list[str]) -> None:
        """The first pass that cosine-adaptive merging needs: every tensor's similarity, and their range."""
        if self.recipe.method != "cosine_adaptive":
            return
        a, b = checkpoints["a"], checkpoints["b"]
        for name in track(keys, f"merge {self.recipe.name}: similarities"):
            if a.tensors[name].is_float:
                self.similarities[name] = methods.cosine_similarity(a.read(name).float(), b.read(name).float())
        self.similarity_range = methods.similarity_range(list(self.similarities.values()))

    def __call__(self, key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        recipe = self.recipe
        alpha = self.weights["alpha"](key) if "alpha" in self.weights else None
        beta = self.weights["beta"](key) if "beta" in self.weights else None
        match recipe.method:
            case "weighted_sum":
                return methods.weighted_sum(tensors["a"], tensors["b"], alpha)
            case "add_difference":
                return methods.add_difference(tensors["a"], tensors["b"], tensors["c"], alpha)
            case "triple_sum":
                return methods.triple_sum(tensors["a"], tensors["b"], tensors["c"], alpha, beta)
            case "sum_twice":
                return methods.sum_twice(tensors["a"], tensors["b"], tensors["c"], alpha, beta)
            case "slerp":
                return methods.slerp(tensors["a"], tensors["b"], alpha)
            case "cosine_adaptive":
                low, high = self.similarity_range
                return methods.cosine_adaptive(tensors["a"], tensors["b"], alpha, self.similarities[key], low, high)
            case "ties":
                models = self.models(tensors)
                weights = recipe.weights or [1.0] * len(models)
                return methods.ties(
                    tensors["base"], models, weights, recipe.density, recipe.scale, tensors.get("target")
                )
            case "dare":
                models = self.models(tensors)
                weights = recipe.weights or [1.0] * len(models)
                generator = methods.key_generator(self.seed, key)
                return methods.dare(
                    tensors["base"], models, weights, recipe.drop_rate, generator, tensors.get("target")
                )
        raise AssertionError(f"no merge for method {recipe.method!r}")

    def models(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[f"models[{index}]"] for index in range(len(self.recipe.inputs.models))]


def recipe_record(
    recipe, inputs: list[MergeInput], checkpoints: dict[str, Checkpoint], config_folder: Path, seed: int | None
) -> dict:
    """What `recipe.json` holds: the recipe, each input's path and the sha256 of each file read from it (a LoRA
    input's file, or every weight file of a model)."""
    record = {
        "name": recipe.name,
        "recipe": recipe.model_dump(mode="json"),
        "inputs": [
            {
                "role": item.role,
                "source": item.source,
                "path": item.path.as_posix(),
                "sha256": {
                    (file.relative_to(item.path).as_posix() if item.path.is_dir() else file.name): file_sha256(
                        file
                    ).hex()
                    for file in (checkpoints[item.role].files if item.role in checkpoints else [item.path])
                },
            }
            for item in inputs
        ],
        "config": config_folder.as_posix(),
    }
    if recipe.method == "dare":
        record["seed"] = seed
    return record
