"""DVC stage `export`: ONNX export of the model `export.model` names, checked against PyTorch."""

from pathlib import Path

from sdpipe.export.onnx import export_onnx
from sdpipe.export.source import export_name, load_export_pipeline
from sdpipe.io import write_json
from sdpipe.progress import log
from sdpipe.stage import run_stage


def main(params) -> None:
    settings, out_dir = params.export, Path(params.paths.export)
    if not settings.enabled:
        (out_dir / "onnx").mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "parity.json", {"enabled": False})
        return
    folder = out_dir / "onnx" / export_name(settings.model)
    pipeline = load_export_pipeline(params, settings.model)
    report = export_onnx(pipeline, folder, settings, seed=params.base.seed, model=settings.model, release_weights=True)
    write_json(out_dir / "parity.json", report)
    log(f"export: {settings.model} -> {folder}")


if __name__ == "__main__":
    run_stage("export", main)
