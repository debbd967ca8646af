"""Writing merged weights one tensor at a time (`sdpipe.io.SafetensorsWriter`), and the diffusers folder.

The merged model is written first as an original-layout single file, tensor by tensor as the merge computes
them. The diffusers folder is then written from that file, again tensor by tensor: each diffusers model's keys
and shapes come from its config alone (the model is built on the meta device, without memory), and
`sdpipe.merge.sources.original_keys` maps them to the single file's keys. The tokenizer, scheduler, feature
extractor, image encoder and every config are copied from the architecture's diffusers folder.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.errors import SdpipeError
from sdpipe.io import DTYPES_BY_NAME, SafetensorsWriter
from sdpipe.merge.sources import COMPONENTS, SKIPPED_SUFFIXES, Checkpoint, original_keys
from sdpipe.models.saving import transformers4_text_key

# --- diffusers folder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentLayout:
    """One diffusers model's weights file: each diffusers key's original-layout key and diffusers shape."""

    file: str  # relative to the pipeline folder
    tensors: dict[str, tuple[str, tuple[int, ...]]]


def meta_models(config_folder: Path, key: str) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoder (SD 1.x-style CLIP) that `config_folder` describes, built on the meta device
    (no memory, no weights read); `key` names the params key of the folder in errors."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        with init_empty_weights():
            return {
                "unet": UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(config_folder, subfolder="unet")
                ),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder, subfolder="vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_folder / "text_encoder")),
            }
    except OSError as error:
        raise SdpipeError(f"{key} {config_folder}: cannot read the unet/vae/text_encoder configs: {error}") from None


def diffusers_layout(config_folder: Path, key: str) -> dict[str, ComponentLayout]:
    """The UNet, VAE and text encoder weights of the architecture that `config_folder` describes (SD 1.x-style
    CLIP text encoder), from their configs alone; `key` names the params key of the folder in errors."""
    models = meta_models(config_folder, key)
    layout = {}
    for component, model in models.items():
        prefix, stem = COMPONENTS[component]
        shapes = {
            name: tuple(tensor.shape)
            for name, tensor in model.state_dict().items()
            if not name.endswith(SKIPPED_SUFFIXES)
        }
        try:
            to_diffusers = original_keys(component, list(shapes), models["unet"].config)
        except SdpipeError as error:
            raise SdpipeError(f"{key} {config_folder}: {error}") from None
        tensors = {
            file_key(component, name): (prefix + original, shapes[name]) for original, name in to_diffusers.items()
        }
        layout[component] = ComponentLayout(f"{component}/{stem}.safetensors", tensors)
    return layout


def file_key(component: str, name: str) -> str:
    """A model's state-dict key as its diffusers-folder file holds it: the text encoder's in transformers 4's layout
    (`sdpipe.models.saving`), which both transformers majors read."""
    return transformers4_text_key(name) if component == "text_encoder" else name


def check_fits(layout: dict[str, ComponentLayout], shapes: dict[str, tuple[int, ...]], config_folder: Path, key: str):
    """Checks that the merged weights (`shapes`, by original key) are exactly what the architecture holds."""
    expected = {
        original: (component, shape) for component, part in layout.items() for original, shape in part.tensors.values()
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
                f"unet, vae and text_encoder do not; {hint}"
            )
        component, shape = expected[original]
        if math.prod(shape) != math.prod(shapes[original]):
            raise SdpipeError(
                f"{key}: the inputs do not fit the architecture of {config_folder}: {original!r} is "
                f"{list(shapes[original])} in the inputs and {list(shape)} in its {component}; {hint}"
            )


def write_diffusers_folder(merged: Checkpoint, layout: dict[str, ComponentLayout], config_folder: Path, out: Path):
    """A `StableDiffusionPipeline.from_pretrained` folder: the merged weights, the rest from `config_folder`."""
    copy_pipeline_files(config_folder, out)
    for part in layout.values():
        tensors = {
            name: (shape, DTYPES_BY_NAME[merged.tensors[original].dtype])
            for name, (original, shape) in part.tensors.items()
        }
        with SafetensorsWriter(out / part.file, tensors, {"format": "pt"}) as writer:
            for name in writer.order:
                original, shape = part.tensors[name]
                writer.write(name, merged.read(original).reshape(shape))


def copy_pipeline_files(config_folder: Path, out: Path) -> None:
    """Copies `model_index.json` and its components from `config_folder`, except the weights of the merged
    models; a model component whose folder has a config but no weights is left out (set to null)."""
    index = json.loads((config_folder / "model_index.json").read_text())
    out.mkdir(parents=True)
    weights = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
    for name, entry in index.items():
        source = config_folder / name
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None or not source.is_dir():
            continue
        if name in COMPONENTS:
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns(*weights))
        elif (source / "config.json").is_file() and not any(any(source.glob(pattern)) for pattern in weights[::2]):
            index[name] = [None, None]
        else:
            shutil.copytree(source, out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
