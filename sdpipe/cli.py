"""The `sdpipe` command: what a person types around `dvc repro`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

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
        console.print(f"[bold red]{escape(error.source)}: {len(error.problems)} problem(s)[/]")
        for problem in error.problems:  # escaped: a problem quotes the user's text, which may hold [brackets]
            console.print(f"  {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"[green]{escape(str(params))}: ok[/]")


@app.command()
def sample(
    prompt: str = typer.Option(..., "--prompt", help="What to draw."),
    out: Path = typer.Option(Path("sample.png"), "--out", help="The PNG to write."),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="An ONNX export folder (<paths.export>/onnx/<name>): run it with onnxruntime."
    ),
    model: str | None = typer.Option(
        None, "--model", help="A diffusers folder, .safetensors checkpoint or hub id: run it with PyTorch."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial latents (same seed, same image in both runtimes)."),
    steps: int = typer.Option(25, "--steps", min=1, help="Sampling steps."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance (1 turns it off)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="What to steer away from."),
) -> None:
    """Generates one image from an ONNX export (onnxruntime: CUDA when present, else the CPU) or a PyTorch model."""
    from sdpipe.errors import SdpipeError
    from sdpipe.export.onnx_pipeline import to_pil
    from sdpipe.io import atomic_path

    if (onnx is None) == (model is None):
        console.print("[bold red]give exactly one of --onnx (an ONNX export folder) or --model (a PyTorch model)[/]")
        raise typer.Exit(2)
    try:
        if onnx is not None:
            from sdpipe.export.onnx_pipeline import OnnxStableDiffusion

            runner = OnnxStableDiffusion(onnx)
            options = dict(seed=seed, steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
            images = runner(prompt, **options)
            runtime = f"onnxruntime ({runner.providers[0]})"
        else:
            images, runtime = torch_sample(model, prompt, seed, steps, guidance_scale, negative_prompt)
    except SdpipeError as error:
        console.print(f"[bold red]{escape(str(error))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    with atomic_path(out) as tmp:
        to_pil(images)[0].save(tmp, format="PNG")
    console.print(f"[green]{escape(str(out))}[/]: {escape(repr(prompt))}, seed {seed}, {steps} steps, {runtime}")


def torch_sample(model: str, prompt: str, seed: int, steps: int, guidance_scale: float, negative_prompt: str):
    """The PyTorch pipeline's image with latents drawn like the ONNX runner's (a CPU generator seeded with `seed`)."""
    import torch

    from sdpipe.models.loading import load_pipeline, resolve_device

    device = resolve_device("auto")
    pipe = load_pipeline(model, device=device, key="--model")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return images, f"PyTorch ({device})"


if __name__ == "__main__":
    app()
