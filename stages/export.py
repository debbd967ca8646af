"""DVC stage `export`: ONNX export of the chosen model (records the export settings)."""

from pathlib import Path

from sdpipe.io import write_json
from sdpipe.stage import run_stage


def main(params) -> None:
    write_json(Path(params.paths.export) / "export.json", params.export.model_dump())


if __name__ == "__main__":
    run_stage("export", main)
