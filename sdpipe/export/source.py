"""Which model `export.model` names, loaded as a PyTorch `StableDiffusionPipeline` ready to export.

- `base`: `base.base_model` (a diffusers folder, a single-file checkpoint or a hub id).
- `train:<method>`: the trained model the way the `evaluate` stage samples it, through the method's
  `sampling_pipeline(params, model_dir, device)` (looked up in `sdpipe.methods.registry`): a full-weights method's
  diffusers folder, the base with a textual-inversion embedding, a LoRA, ... LoRA-style adapters are fused into the
  weights before the export, so the graphs hold plain layers.
- `merge:<recipe>`: the merged model under `<paths.merge>/<recipe>/model/`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.config.merge import LORA_FILE_METHODS
from sdpipe.errors import SdpipeError
from sdpipe.methods.registry import METHODS
from sdpipe.models.loading import load_pipeline

KEY = "export.model"


def export_name(model: str) -> str:
    """The folder name under `<paths.export>/onnx/`: `base`, `train-<method>` or `merge-<recipe>`."""
    return model.replace(":", "-")


def load_export_pipeline(params, model: str):
    """The fp32 CPU pipeline of `model` (a value of `export.model`), adapters fused."""
    cpu = torch.device("cpu")
    base = params.base
    if model == "base":
        return load_pipeline(base.base_model, base.base_model_config, device=cpu)
    kind, name = model.split(":", 1)
    if kind == "merge":
        recipe = params.merge.recipes.get(name)
        if recipe is not None and recipe.method in LORA_FILE_METHODS:
            raise SdpipeError(
                f"{KEY} is {model!r}, a {recipe.method} recipe, which writes a LoRA file and no model; export a model "
                f"that uses it (`lora_bake` it into one) instead"
            )
        folder = Path(params.paths.merge) / name / "model"
        if not folder.exists():
            raise SdpipeError(f"{KEY} is {model!r} but {folder} does not exist; run `dvc repro merge` first")
        return load_pipeline(str(folder), base.base_model_config, device=cpu, key=KEY)
    if name not in METHODS:
        raise SdpipeError(f"{KEY} is {model!r} but there is no training method {name!r} (one of {', '.join(METHODS)})")
    model_dir = Path(params.paths.train) / name / "model"
    if not model_dir.is_dir():
        raise SdpipeError(f"{KEY} is {model!r} but {model_dir} does not exist; run `dvc repro train@{name}` first")
    pipeline, _trigger = METHODS[name].sampling_pipeline(params, model_dir, cpu)
    fuse_adapters(pipeline)
    return pipeline


def fuse_adapters(pipeline) -> None:
    """Merges LoRA-style (PEFT) adapters loaded with `load_lora_weights` or `add_adapter` into the base weights."""
    adapters = pipeline.get_list_adapters() if hasattr(pipeline, "get_list_adapters") else {}
    if any(adapters.values()):
        components = [name for name, names in adapters.items() if names]
        pipeline.fuse_lora(components=components)
        pipeline.unload_lora_weights()
