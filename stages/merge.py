"""DVC stage `merge`: runs each recipe of `merge.recipes` into `<paths.merge>/<recipe>/`."""

from pathlib import Path

from sdpipe.merge.recipe import architecture_folder, merge_recipe, resolve_inputs
from sdpipe.stage import run_stage


def main(params) -> None:
    base = params.base
    for recipe in params.merge.recipes.values():
        inputs = resolve_inputs(recipe, base_model=base.base_model, train_dir=params.paths.train)
        config_folder = architecture_folder(
            recipe, inputs, base_model=base.base_model, base_model_config=base.base_model_config
        )
        merge_recipe(
            recipe, inputs, config_folder=config_folder, out_dir=Path(params.paths.merge) / recipe.name, seed=base.seed
        )


if __name__ == "__main__":
    run_stage("merge", main)
