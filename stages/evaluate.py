"""DVC stages `evaluate_base`, `evaluate@<method>`, `evaluate_merge@<recipe>`: sample one model with the evaluation
prompts and seeds and score it (`python stages/evaluate.py <model>`: base, a method of train.methods, merge-<recipe>).
The `scoreboard` stage (stages/scoreboard.py) gathers the models' metrics into the summary."""

import sys

from sdpipe.evaluate import evaluate_model
from sdpipe.models.loading import resolve_device
from sdpipe.stage import run_stage


def main(params) -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    evaluate_model(params, name, resolve_device(params.base.device))


if __name__ == "__main__":
    run_stage("evaluate", main)
