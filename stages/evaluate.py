"""DVC stage `evaluate`: sample every model with the same prompts and seeds, score it, write the summary."""

from pathlib import Path

from sdpipe.evaluate import evaluate_models, write_summary
from sdpipe.models.loading import resolve_device
from sdpipe.stage import run_stage


def main(params) -> None:
    rows = evaluate_models(params, resolve_device(params.base.device))
    write_summary(rows, Path(params.paths.eval))


if __name__ == "__main__":
    run_stage("evaluate", main)
