"""DVC stages `evaluate_base`, `evaluate@<method>`, `evaluate_merge@<recipe>`: sample one model with the evaluation
prompts and seeds and score it (`python stages/evaluate.py <model>`: base, a method of train.methods, merge-<recipe>;
`<family>-base` and `<family>-<method>` for the models of an extra family, `evaluate_base_family@<family>` and
`evaluate_family@<family>-<method>`).
The `scoreboard` stage (stages/scoreboard.py) gathers the models' metrics into the summary."""

import sys

from sdpipe.config.sdxl import family_view
from sdpipe.evaluate import evaluate_model
from sdpipe.models.loading import resolve_device
from sdpipe.stage import run_stage


def main(params) -> None:
    row = sys.argv[1] if len(sys.argv) > 1 else ""
    family, _, name = row.partition("-")
    if family in params.base.extra_families:  # `sdxl-lora`: the model `lora` of the extra family `sdxl`
        params = family_view(params, family)
    else:
        name = row
    evaluate_model(params, name, resolve_device(params.base.device), row=row)


if __name__ == "__main__":
    run_stage("evaluate", main)
