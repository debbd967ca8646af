"""Writing merged weights one tensor at a time (`sdpipe.io.SafetensorsWriter`), and the diffusers folder.

The merged model is written first as an original-layout single file, tensor by tensor as the merge computes
them. The diffusers folder is then written from that file, again tensor by tensor: each diffusers model's keys
and shapes come from its config alone (the model is built on the meta device, without memory), and
`sdpipe.merge.sources.original_keys` maps them to the single file's keys (SDXL's `text_encoder_2/` is cut back out
of OpenCLIP's fused q/k/v and transposed projection). The tokenizers, scheduler, feature extractor, image encoder
and every config are copied from the architecture's diffusers folder.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.families import folder_family
from sdpipe.io import DTYPES_BY_NAME, SafetensorsWriter
from sdpipe.merge.sources import SKIPPED_SUFFIXES, Checkpoint, family_components, original_keys
from sdpipe.models.saving import transformers4_text_key
from sdpipe.models.single_file import SDXL_OPEN_CLIP_PREFIX, open_clip_part

# --- diffusers folder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a diffusers tensor is in the original layout: the `part`-th of the `parts` tensors that the original
    key is made of (`sources.original_keys`), and its diffusers shape."""

    original: str
    shape: tuple[int, ...]
    part: int = 0
    parts: int = 1

    @property
    def original_shape(self) -> tuple[int, ...]:
        """The shape of the whole original tensor, up to transposition (the VAE's 1x1 convs: up to reshaping)."""
        return (self.parts * self.shape[0], *self.shape[1:]) if self.parts > 1 else self.shape

    def from_original(self, tensor: torch.Tensor) -> torch.Tensor:
        """The diffusers tensor out of the original one."""
        if self.original.startswith(SDXL_OPEN_CLIP_PREFIX):
            tensor = open_clip_part(self.original.removeprefix(SDXL_OPEN_CLIP_PREFIX), tensor, self.part, self.parts)
        return tensor.reshape(self.shape)


@dataclass(frozen=True)
class ComponentLayout:
    """One diffusers model's weights file: where each of its keys is in the original layout."""

    file: str  # relative to the pipeline folder
    tensors: dict[str, Placement]


def meta_models(config_folder: Path, key: str) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoders (SD 1.x-style CLIP; SDXL's two) that `config_folder` describes, built on the
    meta device (no memory, no weights read); `key` names the params key of the folder in errors."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = folder_family(config_folder, key=key)
    try:
        with init_empty_weights():
            models = {
                "unet": UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(config_folder, subfolder="unet")
                ),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder, subfolder="vae")),
            }
            for name, class_name in zip(family.text_encoders, family.text_encoder_classes):
                config = transformers.CLIPTextConfig.from_pretrained(config_folder / name)
                models[name] = getattr(transformers, class_name)(config)
            return models
    except OSError as error:
        components = "/".join(("unet", "vae", *family.text_encoders))
        raise SdpipeError(f"{key} {config_folder}: cannot read the {components} configs: {error}") from None


def diffusers_layout(config_folder: Path, key: str) -> dict[str, ComponentLayout]:
    """The UNet, VAE and text encoder weights of the architecture that `config_folder` describes (SD 1.x-style
    CLIP text encoder, or SDXL's two), from their configs alone; `key` names the params key of the folder in errors."""
    models = meta_models(config_folder, key)
    components = family_components(folder_family(config_folder, key=key))
    layout = {}
    for component, model in models.items():
        prefix, stem = components[component]
        places = model_placements(component, model, prefix, models["unet"].config, f"{key} {config_folder}")
        tensors = {file_key(component, name): place for name, place in places.items()}
        layout[component] = ComponentLayout(f"{component}/{stem}.safetensors", tensors)
    return layout


def model_placements(component: str, model, prefix: str, unet_config, where: str) -> dict[str, Placement]:
    """{state-dict key: its `Placement` under `prefix`} of every weight of a diffusers `component` model (`where`
    names the architecture in errors)."""
    shapes = {
        name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if not name.endswith(SKIPPED_SUFFIXES)
    }
    try:
        to_diffusers = original_keys(component, list(shapes), unet_config)
    except SdpipeError as error:
        raise SdpipeError(f"{where}: {error}") from None
    return {
        name: Placement(prefix + original, shapes[name], part, len(names))
        for original, names in to_diffusers.items()
        for part, name in enumerate(names)
    }


def file_key(component: str, name: str) -> str:
    """A model's state-dict key as its diffusers-folder file holds it: the text encoder's in transformers 4's layout
    (`sdpipe.models.saving`), which both transformers majors read."""
    return transformers4_text_key(name) if component == "text_encoder" else name


def check_fits(layout: dict[str, ComponentLayout], shapes: dict[str, tuple[int, ...]], config_folder: Path, key: str):
    """Checks that the merged weights (`shapes`, by original key) are exactly what the architecture holds."""
    expected = {
        place.original: (component, place.original_shape)
        for component, part in layout.items()
        for place in part.tensors.values()
    }
    hint = f"set {key}.config to a diffusers folder of the inputs' architecture"
    for original in sorted(set(expected) | set(shapes)):
        if original not in shapes:
            raise SdpipeError(
                f"{key}: the inputs do not fit the architecture of {config_folder}: its {expected[original][0]} has "
                f"{original!r} and the inputs do not; {hint}"
            )
        if original not in expected:
            raise SdpipeError(
                f"{key}: the inputs do not fit the architecture of {config_folder}: they have {original!r} and its "
                f"{', '.join(layout)} do not; {hint}"
            )
        component, shape = expected[original]
        if math.prod(shape) != math.prod(shapes[original]):
            raise SdpipeError(
                f"{key}: the inputs do not fit the architecture of {config_folder}: {original!r} is "
                f"{list(shapes[original])} in the inputs and {list(shape)} in its {component}; {hint}"
            )


def write_diffusers_folder(merged: Checkpoint, layout: dict[str, ComponentLayout], config_folder: Path, out: Path):
    """A `StableDiffusionPipeline.from_pretrained` folder (`StableDiffusionXLPipeline` for SDXL): the merged
    weights, the rest from `config_folder`."""
    copy_pipeline_files(config_folder, out, layout)
    for part in layout.values():
        tensors = {
            name: (place.shape, DTYPES_BY_NAME[merged.tensors[place.original].dtype])
            for name, place in part.tensors.items()
        }
        with SafetensorsWriter(out / part.file, tensors, {"format": "pt"}) as writer:
            for name in writer.order:
                place = part.tensors[name]
                writer.write(name, place.from_original(merged.read(place.original)))


def copy_pipeline_files(config_folder: Path, out: Path, merged: Iterable[str]) -> None:
    """Copies `model_index.json` and its components from `config_folder`, except the weights of the `merged`
    components; a model component whose folder has a config but no weights is left out (set to null)."""
    index = json.loads((config_folder / "model_index.json").read_text())
    out.mkdir(parents=True)
    weights = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
    for name, entry in index.items():
        source = config_folder / name
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or not source.is_dir():
            continue
        if name in merged:
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns(*weights))
        elif (source / "config.json").is_file() and not any(any(source.glob(pattern)) for pattern in weights[::2]):
            index[name] = [None, None]
        else:
            shutil.copytree(source, out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
