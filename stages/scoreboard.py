"""DVC stage `scoreboard`: the evaluated models' metrics (one row each, the base first, then each extra family's
base and models) into `summary.json` and `summary.md`, with what compares each model with its base
(`prior_preservation`)."""

from pathlib import Path

from sdpipe.evaluate import scoreboard_rows, write_summary
from sdpipe.stage import run_stage


def main(params) -> None:
    write_summary(scoreboard_rows(params), Path(params.paths.eval))


if __name__ == "__main__":
    run_stage("scoreboard", main)
