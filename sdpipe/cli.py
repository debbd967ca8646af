"""The `sdpipe` command: what a person types around `dvc repro`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from sdpipe.config import ParamsError, load_params

app = typer.Typer(help="sdpipe: reproducible Stable Diffusion customization with DVC.", no_args_is_help=True)
datasets_app = typer.Typer(help="Start dataset folders under datasets/.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
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
    prompt: str | None = typer.Option(None, "--prompt", help="What to draw."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="A text file with one prompt per line: writes <out>-000.png, <out>-001.png, ..."
    ),
    out: Path = typer.Option(Path("sample.png"), "--out", help="The PNG to write."),
    onnx: Path | None = typer.Option(
        None, "--onnx", help="An ONNX export folder (<paths.export>/onnx/<name>): run it with onnxruntime."
    ),
    model: str | None = typer.Option(
        None, "--model", help="A diffusers folder, .safetensors checkpoint or hub id: run it with PyTorch."
    ),
    method: str | None = typer.Option(
        None,
        "--method",
        help="A method this project trained (train@<method>): the base model with its files loaded as a user would "
        "(embedding, LoRA, hypernetwork, ...), at the strengths params.yaml gives.",
    ),
    null_text: Path | None = typer.Option(
        None,
        "--null-text",
        help="A null-text inversion record (<paths.train>/null_text_inversion/model/<image>.safetensors): "
        "reconstructs its image, or with --prompt edits it (its caption with a word changed).",
    ),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="The params file, for --method."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial latents (same seed, same image in both runtimes)."),
    steps: int = typer.Option(25, "--steps", min=1, help="Sampling steps."),
    guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance (1 turns it off)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="What to steer away from."),
) -> None:
    """Generates images from an ONNX export (onnxruntime: CUDA when present, else the CPU), a PyTorch model, a
    trained method, or edits an image inverted by null-text inversion. Each PNG carries its generation parameters in
    a `parameters` text chunk, as A1111 writes them."""
    from sdpipe.errors import SdpipeError
    from sdpipe.export.onnx_pipeline import to_pil
    from sdpipe.io import atomic_path

    if sum(source is not None for source in (onnx, model, method, null_text)) != 1:
        console.print(
            "[bold red]give exactly one of --onnx (an ONNX export), --model (a PyTorch model), --method "
            "or --null-text (an inverted image)[/]"
        )
        raise typer.Exit(2)
    if prompt is not None and prompt_file is not None or (prompt is None and prompt_file is None and not null_text):
        console.print("[bold red]give exactly one of --prompt and --prompt-file[/]")
        raise typer.Exit(2)
    try:
        prompts = [prompt] if prompt is not None else read_prompt_file(prompt_file) if prompt_file else [None]
        if null_text is not None:
            generate, runtime, model_name, record = null_text_editor(null_text)
            seed, steps, guidance_scale, negative_prompt = None, record.num_inference_steps, record.guidance_scale, ""
            prompts = [record.prompt if text is None else text for text in prompts]
        elif onnx is not None:
            from sdpipe.export.onnx_pipeline import load_onnx_pipeline

            runner = load_onnx_pipeline(onnx)
            options = dict(seed=seed, steps=steps, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
            generate = lambda text: runner(text, **options)  # noqa: E731
            runtime, model_name = f"onnxruntime ({runner.providers[0]})", onnx.name
        else:
            pipe, runtime, model_name = torch_pipeline(model, method, params_file)
            generate = lambda text: torch_sample(pipe, text, seed, steps, guidance_scale, negative_prompt)  # noqa: E731
        for index, text in enumerate(prompts):
            image = to_pil(generate(text))[0]
            path = out if len(prompts) == 1 else out.with_name(f"{out.stem}-{index:03d}{out.suffix or '.png'}")
            info = a1111_parameters(text, negative_prompt, steps, guidance_scale, seed, image.size, model_name)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
            seeded = "" if seed is None else f"seed {seed}, "
            console.print(f"[green]{escape(str(path))}[/]: {escape(repr(text))}, {seeded}{steps} steps, {runtime}")
    except SdpipeError as error:
        raise fail(error) from None


def read_prompt_file(path: Path) -> list[str]:
    from sdpipe.errors import SdpipeError

    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise SdpipeError(f"--prompt-file {path}: cannot read it ({error})") from None
    if not prompts:
        raise SdpipeError(f"--prompt-file {path}: no prompts (one per line expected)")
    return prompts


def torch_pipeline(model: str | None, method: str | None, params_file: Path):
    """The PyTorch pipeline of `--model`, or of `--method` (loaded by the method's `sampling_pipeline`)."""
    from sdpipe.errors import SdpipeError
    from sdpipe.methods.registry import METHODS
    from sdpipe.models.loading import load_pipeline, resolve_device

    device = resolve_device("auto")
    if model is not None:
        return load_pipeline(model, device=device, key="--model"), f"PyTorch ({device})", Path(model).name
    if method not in METHODS:
        raise SdpipeError(f"--method {method!r}: not a training method (one of {', '.join(METHODS)})")
    try:
        params = load_params(params_file)
    except ParamsError as error:
        raise SdpipeError(f"{error.source}: {'; '.join(error.problems)}") from None
    model_dir = Path(params.paths.train) / method / "model"
    if not model_dir.is_dir():
        raise SdpipeError(f"--method {method}: {model_dir} does not exist; run `dvc repro train@{method}` first")
    pipe, trigger = METHODS[method].sampling_pipeline(params, model_dir, device)
    console.print(f"{method}: the concept's word in prompts is {escape(repr(trigger))}", highlight=False)
    return pipe, f"PyTorch ({device})", method


def null_text_editor(record_path: Path):
    """Reconstructs (its own caption) or edits (another prompt) an image inverted by `train@null_text_inversion`,
    on the base model the record names."""
    import numpy as np

    from sdpipe.errors import SdpipeError
    from sdpipe.methods import null_text_inversion
    from sdpipe.models.loading import load_pipeline, resolve_device

    if not record_path.is_file():
        raise SdpipeError(f"--null-text {record_path}: no such file")
    record = null_text_inversion.load_record(record_path)
    if not record.base_model:
        raise SdpipeError(f"--null-text {record_path}: the record does not name its base model (metadata base_model)")
    device = resolve_device("auto")
    pipe = load_pipeline(record.base_model, device=device, key=f"{record_path} (its base_model)")
    pipe.set_progress_bar_config(disable=True)
    console.print(f"null-text inversion of {record.image_id!r}, captioned {escape(repr(record.prompt))}", highlight=False)

    def generate(text: str) -> np.ndarray:
        image = null_text_inversion.reconstruct(pipe, record, text)
        return np.asarray(image, dtype=np.float32)[None] / 255

    return generate, f"PyTorch ({device})", f"null-text:{record.image_id}", record


def torch_sample(pipe, prompt: str, seed: int, steps: int, guidance_scale: float, negative_prompt: str):
    """The PyTorch pipeline's image with latents drawn like the ONNX runner's (a CPU generator seeded with `seed`)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def a1111_parameters(prompt, negative_prompt, steps, guidance_scale, seed, size, model_name):
    """The PNG `parameters` text chunk A1111 writes (and its PNG Info tab, ComfyUI and civitai read)."""
    from PIL.PngImagePlugin import PngInfo

    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    width, height = size
    seed_field = "" if seed is None else f"Seed: {seed}, "  # no seed: a null-text edit starts from inverted noise
    lines.append(f"Steps: {steps}, CFG scale: {guidance_scale}, {seed_field}Size: {width}x{height}, Model: {model_name}")
    info = PngInfo()
    info.add_text("parameters", "\n".join(lines))
    return info


def fail(error: Exception) -> typer.Exit:
    """Prints a user error (no traceback) and returns the exit to raise."""
    console.print(f"[bold red]{escape(str(error))}[/]", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="A .safetensors/.pt/.ckpt/.bin file or a diffusers folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Tells what a checkpoint, LoRA, embedding or hypernetwork file (or diffusers folder) is, with its hashes.

    Pickled files are read with torch.load(weights_only=True) only; one that needs code to load is refused.
    """
    import json

    from sdpipe.errors import SdpipeError
    from sdpipe.inspection import inspect_model, print_report

    try:
        report = inspect_model(path)
    except SdpipeError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print_report(report, console)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="The file or diffusers folder to convert."),
    dst: Path = typer.Argument(..., help="The file or folder to write (atomically)."),
    to: str | None = typer.Option(
        None, "--to", help="kohya | peft | a1111-pt | safetensors | single-file | diffusers; default: the usual one."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="A local diffusers folder: the architecture of a single file (--to diffusers), "
        "or exact layer names for kohya → peft."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="fp32 | fp16 | bf16 for --to single-file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
) -> None:
    """Converts between kohya and diffusers/PEFT LoRA, A1111 .pt and .safetensors embeddings, diffusers folders and
    single-file checkpoints, and pickled state dicts to .safetensors."""
    from sdpipe.conversion import convert_model
    from sdpipe.errors import SdpipeError

    try:
        summary = convert_model(src, dst, to=to, config=config, dtype=dtype, overwrite=overwrite)
    except SdpipeError as error:
        raise fail(error) from None
    console.print(f"[green]{escape(summary)}[/]", highlight=False, soft_wrap=True)


@datasets_app.command("add")
def datasets_add(
    name: str = typer.Argument(..., help="The dataset name: datasets/<name>/."),
    source: Path | None = typer.Option(None, "--from", help="A folder of images and <stem>.txt captions to copy."),
    class_word: str | None = typer.Option(
        None, "--class-word", help="What the subject is (noted; see caption.class_word)."
    ),
    token: str | None = typer.Option(None, "--token", help="The trigger word (noted; see caption.token)."),
    root: Path = typer.Option(Path("datasets"), "--root", help="The datasets folder (params.yaml paths.datasets)."),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="The params file to read base.datasets from."),
    dvc: bool = typer.Option(False, "--dvc", help="Run `dvc add` (only where datasets are tracked with .dvc files)."),
) -> None:
    """Creates datasets/<name>/ (copying and checking images from --from) with a notes template, and prints the
    next steps. params.yaml is never edited: the dataset joins the pipeline once it is listed in base.datasets."""
    from sdpipe.data.new_dataset import add_dataset, dvc_add_command, next_steps, run_command
    from sdpipe.errors import SdpipeError

    try:
        dvc_command = dvc_add_command(name, root) if dvc else None  # checked before anything is written
        added = add_dataset(name, root=root, source=source, token=token, class_word=class_word)
        if dvc_command:
            run_command(dvc_command)
    except SdpipeError as error:
        raise fail(error) from None
    counts = f"{added['images']} image(s), {added['captions']} caption file(s)"
    console.print(f"[green]{escape(added['folder'])}[/]: {counts}")
    if added["ignored"]:
        console.print(f"not copied (neither images nor captions): {escape(', '.join(added['ignored']))}")
    if dvc_command:
        console.print(f"ran: {escape(' '.join(dvc_command))}")
    console.print("next:")
    for step in next_steps(name, root, params, token, class_word, added["images"]):
        console.print(f"  - {escape(step)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    app()
