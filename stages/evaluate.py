"""DVC stage `evaluate`: sample every model with the same prompts and seeds, score it, write the summary."""

from pathlib import Path

from sdpipe.evaluate import evaluate_pipeline, write_summary
from sdpipe.models.loading import load_pipeline, resolve_device
from sdpipe.stage import run_stage


def main(params) -> None:
    out_dir = Path(params.paths.eval)
    device = resolve_device(params.base.device)
    base = load_pipeline(params.base.base_model, params.base.base_model_config, device=device)
    rows = {"base": evaluate_pipeline(base, params.evaluate, out_dir / "base")}
    write_summary(rows, out_dir)


if __name__ == "__main__":
    run_stage("evaluate", main)
