"""The `sdpipe` command: what a person types around `dvc repro`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sdpipe.config import ParamsError, load_params

app = typer.Typer(help="sdpipe: reproducible Stable Diffusion customization with DVC.", no_args_is_help=True)
console = Console()


@app.callback()
def main() -> None:
    """sdpipe: reproducible Stable Diffusion customization with DVC."""


@app.command()
def validate(params: Path = typer.Argument(Path("params.yaml"), help="The params file to check.")) -> None:
    """Checks a params file; prints each problem with its YAML path and exits 1 if there are any."""
    try:
        load_params(params)
    except ParamsError as error:
        console.print(f"[bold red]{error.source}: {len(error.problems)} problem(s)[/]")
        for problem in error.problems:
            console.print(f"  {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"[green]{params}: ok[/]")


if __name__ == "__main__":
    app()
