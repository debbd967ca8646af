"""What the merge tests share: running a recipe as the `merge` stage does, and reading a merged file whole."""

from __future__ import annotations

import torch

from sdpipe.config import parse_params
from sdpipe.merge.recipe import architecture_folder, merge_recipe, resolve_inputs
from sdpipe.merge.sources import open_checkpoint


def run_recipe(recipe: dict, base_model, out_dir, name: str = "test"):
    """Runs `recipe` (a params mapping) with `base_model` as base.base_model; returns its output folder."""
    params = parse_params({"base": {"base_model": str(base_model)}, "merge": {"recipes": {name: recipe}}})
    recipe = params.merge.recipes[name]
    inputs = resolve_inputs(recipe, base_model=params.base.base_model, train_dir="unused")
    config = architecture_folder(recipe, inputs, base_model=params.base.base_model, base_model_config=None)
    return merge_recipe(recipe, inputs, config_folder=config, out_dir=out_dir / name, seed=params.base.seed)


def read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (file or folder) under the original single-file keys."""
    with open_checkpoint(path, "k") as checkpoint:
        return {key: checkpoint.read(key) for key in checkpoint.tensors}
