"""DVC stage `merge`: run the merge recipes listed in params (writes the resolved recipe list)."""

from pathlib import Path

from sdpipe.io import write_json
from sdpipe.stage import run_stage


def main(params) -> None:
    write_json(Path(params.paths.merge) / "recipes.json", params.merge.recipes)


if __name__ == "__main__":
    run_stage("merge", main)
