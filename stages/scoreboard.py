"""DVC stage `scoreboard`: the evaluated models' metrics (one row each, the base first) into `summary.json` and
`summary.md`, with what compares each model with the base (`prior_preservation`)."""

from pathlib import Path

from sdpipe.evaluate import summarize, write_summary
from sdpipe.stage import run_stage


def main(params) -> None:
    write_summary(summarize(params), Path(params.paths.eval))


if __name__ == "__main__":
    run_stage("scoreboard", main)
