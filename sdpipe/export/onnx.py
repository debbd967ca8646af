"""ONNX export of a Stable Diffusion pipeline (SD 1.x/2.x or SDXL), with a parity check against the PyTorch modules.

An SD 1.x/2.x folder is the layout diffusers' `OnnxStableDiffusionPipeline` loads (and `OnnxStableDiffusion` runs):

    model_index.json
    text_encoder/model.onnx  input_ids [batch, sequence] int32 -> last_hidden_state, pooler_output
    unet/model.onnx          sample [batch, C, h, w], timestep [1 or batch] float32,
                             encoder_hidden_states [batch, sequence, D] -> out_sample
    vae_encoder/model.onnx   sample [batch, 3, H, W] in [-1, 1] -> latent_sample (posterior mean, unscaled)
    vae_decoder/model.onnx   latent_sample (unscaled) -> sample [batch, 3, H, W] in [-1, 1]
    <component>/config.json  the PyTorch module's config (latent size, the VAE's scaling factor)
    tokenizer/, scheduler/
    parity.json              the measured errors

An SDXL folder is the layout of optimum's ONNX SDXL export, which optimum's `ORTStableDiffusionXLPipeline` loads (and
`OnnxStableDiffusionXL` runs): `model_index.json` is the PyTorch pipeline's own (`StableDiffusionXLPipeline`), and

    text_encoder/model.onnx    input_ids -> last_hidden_state, pooler_output, hidden_states.0 ... hidden_states.<layers>
    text_encoder_2/model.onnx  input_ids -> text_embeds (the pooled embedding), last_hidden_state, hidden_states.*
    unet/model.onnx            sample, timestep (a scalar), encoder_hidden_states, text_embeds [batch, P],
                               time_ids [batch, 6] -> out_sample
    vae_encoder/, vae_decoder/ as above; tokenizer/, tokenizer_2/, scheduler/

Batch, sequence, height and width are dynamic axes. A component whose weights pass protobuf's 2 GB limit
keeps them in one `weights.pb` beside its `model.onnx`.

The parity check runs each exported component in onnxruntime and its module in PyTorch (fp32, CPU) on random
inputs of two shapes (the export shape with batch 2, and batch 1 at twice the width, which exercises the
dynamic axes), then one end-to-end generation of each with the same seed. Out of tolerance, nothing is
written. The export shape is the UNet's `sample_size`, at most `CHECK_LATENT_SIZE` (the axes are dynamic, so the
graph is the same): at SD 1.5's 64 the wide case alone made onnxruntime hold gigabytes of attention scores.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sdpipe.config.export import ExportParams
from sdpipe.errors import SdpipeError
from sdpipe.export.onnx_pipeline import execution_providers, inference_session, load_onnx_pipeline
from sdpipe.export.ort_optimizer import convert_to_fp16, optimize_for_cuda
from sdpipe.families import SDXL, pipeline_family
from sdpipe.io import atomic_path
from sdpipe.models.saving import save_tokenizer
from sdpipe.progress import log

EXTERNAL_DATA_FILE = "weights.pb"  # the name diffusers' ONNX conversion used
PROTOBUF_LIMIT = 2**31 - 2**26  # 2 GB less room for the graph itself
# Parity inputs: (batch, width factor, timesteps). The first is how pipelines call the UNet (one timestep for a
# batch of two, the guidance pair); the second checks the dynamic axes at a new batch size and width.
PARITY_CASES = ((2, 1, 1), (1, 2, 1))
CHECK_GUIDANCE = 7.5  # classifier-free guidance of the end-to-end check (both sides are given it)
SEQUENCE_AXES = {0: "batch", 1: "sequence"}
CHECK_LATENT_SIZE = 32  # latent side of the trace, the parity inputs and the end-to-end image (256 px for SD 1.x)


# ---------------------------------------------------------------------------------------------------------
# What each component's graph computes


class TextEncoderGraph(nn.Module):
    """The text encoder's two outputs (`CLIPTextModel`: last_hidden_state, pooler_output; `CLIPTextModelWithProjection`:
    text_embeds, last_hidden_state), then, with `hidden_states`, every layer's hidden state (SDXL's context is the
    penultimate one)."""

    def __init__(self, text_encoder, hidden_states: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_states = hidden_states

    def forward(self, input_ids):
        outputs = self.text_encoder(input_ids, output_hidden_states=self.hidden_states, return_dict=False)
        return (outputs[0], outputs[1], *outputs[2]) if self.hidden_states else (outputs[0], outputs[1])


class UNetGraph(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SdxlUNetGraph(UNetGraph):
    """SDXL's UNet with its added conditioning (the pooled text embedding and the size and crop time ids) as inputs."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """The posterior mean: deterministic, where diffusers' old converter drew a sample inside the graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample).latent_dist.mode()


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class GraphSpec:
    """A component's graph: its module, input and output names, and which axes of each are dynamic."""

    module: nn.Module
    inputs: dict[str, dict[int, str]]
    outputs: dict[str, dict[int, str]]


def graph_specs(pipe) -> dict[str, GraphSpec]:
    """Each component's graph, by folder name: SD 1.x/2.x as diffusers' ONNX pipeline reads them, SDXL as optimum's."""
    image_axes = {0: "batch", 2: "height", 3: "width"}
    family = pipeline_family(pipe)
    sdxl = family is SDXL
    # SDXL's context is the encoders' penultimate hidden states: every layer's is an output, as optimum exports them
    text_encoders = {name: text_encoder_spec(getattr(pipe, name), hidden_states=sdxl) for name in family.text_encoders}
    if not sdxl:
        unet = GraphSpec(
            UNetGraph(pipe.unet),
            {"sample": image_axes, "timestep": {0: "timestep_batch"}, "encoder_hidden_states": SEQUENCE_AXES},
            {"out_sample": image_axes},
        )
    else:
        unet = GraphSpec(
            SdxlUNetGraph(pipe.unet),
            {
                "sample": image_axes,
                "timestep": {},  # a scalar, as optimum exports it (one timestep for the whole batch)
                "encoder_hidden_states": SEQUENCE_AXES,
                "text_embeds": {0: "batch"},
                "time_ids": {0: "batch"},
            },
            {"out_sample": image_axes},
        )
    return {
        **text_encoders,
        "unet": unet,
        "vae_encoder": GraphSpec(VaeEncoderGraph(pipe.vae), {"sample": image_axes}, {"latent_sample": image_axes}),
        "vae_decoder": GraphSpec(VaeDecoderGraph(pipe.vae), {"latent_sample": image_axes}, {"sample": image_axes}),
    }


def text_encoder_spec(text_encoder, hidden_states: bool) -> GraphSpec:
    """A text encoder's graph: its two outputs under transformers' names (`CLIPTextModelWithProjection`: text_embeds,
    last_hidden_state; `CLIPTextModel`: last_hidden_state, pooler_output), then with `hidden_states` every layer's."""
    first = (
        {"text_embeds": {0: "batch"}, "last_hidden_state": SEQUENCE_AXES}
        if hasattr(text_encoder, "text_projection")
        else {"last_hidden_state": SEQUENCE_AXES, "pooler_output": {0: "batch"}}
    )
    layers = text_encoder.config.num_hidden_layers + 1 if hidden_states else 0
    outputs = {**first, **{f"hidden_states.{i}": SEQUENCE_AXES for i in range(layers)}}
    return GraphSpec(TextEncoderGraph(text_encoder, hidden_states), {"input_ids": SEQUENCE_AXES}, outputs)


def component_module(pipe, component: str) -> nn.Module:
    """The PyTorch module a component's graph runs: a text encoder, the UNet or the VAE."""
    return pipe.vae if component.startswith("vae_") else getattr(pipe, component)


def torch_modules(pipe) -> list[nn.Module]:
    return [getattr(pipe, name) for name in (*pipeline_family(pipe).text_encoders, "unet", "vae")]


def example_inputs(
    pipe, component: str, generator: torch.Generator, batch: int = 2, width_factor: int = 1, timesteps: int = 2
) -> dict:
    """Random inputs of the export shape (`width_factor` 1) or wider, as torch tensors by input name; the UNet gets
    `timesteps` timesteps (1, or one per batch item; SDXL's one scalar)."""
    unet, vae = pipe.unet.config, pipe.vae.config
    latent = check_latent_size(pipe)
    latent_shape = (batch, unet.in_channels, latent, latent * width_factor)
    scale = 2 ** (len(vae.block_out_channels) - 1)
    sequence = pipe.tokenizer.model_max_length
    if component.startswith("text_encoder"):
        vocab = getattr(pipe, component).config.vocab_size
        return {"input_ids": torch.randint(0, vocab, (batch, sequence), generator=generator, dtype=torch.int32)}
    if component == "unet" and pipeline_family(pipe) is SDXL:
        pooled_width = pipe.text_encoder_2.config.projection_dim
        return {
            "sample": torch.randn(latent_shape, generator=generator),
            "timestep": torch.randint(0, 1000, (), generator=generator).float(),
            "encoder_hidden_states": torch.randn(batch, sequence, unet.cross_attention_dim, generator=generator),
            "text_embeds": torch.randn(batch, pooled_width, generator=generator),
            "time_ids": torch.randint(0, 1024, (batch, 6), generator=generator).float(),  # sizes and crops in pixels
        }
    if component == "unet":
        return {
            "sample": torch.randn(latent_shape, generator=generator),
            "timestep": torch.randint(0, 1000, (timesteps,), generator=generator).float(),
            "encoder_hidden_states": torch.randn(batch, sequence, unet.cross_attention_dim, generator=generator),
        }
    if component == "vae_encoder":
        image_shape = (batch, vae.in_channels, latent * scale, latent * scale * width_factor)
        return {"sample": torch.rand(image_shape, generator=generator) * 2 - 1}
    latents = torch.randn(batch, vae.latent_channels, latent, latent * width_factor, generator=generator)
    return {"latent_sample": latents / vae.scaling_factor}  # unscaled latents are about 1 / scaling_factor wide


def check_latent_size(pipe) -> int:
    """The latent side the export is traced and checked at: the UNet's own, at most `CHECK_LATENT_SIZE`."""
    return min(pipe.unet.config.sample_size, CHECK_LATENT_SIZE)


# ---------------------------------------------------------------------------------------------------------
# Export


def export_onnx(
    pipe, out_dir: str | Path, settings: ExportParams, seed: int = 0, model: str = "", release_weights: bool = False
) -> dict:
    """Exports `pipe` (a diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline`) to `out_dir` and returns
    the parity report.

    Every PyTorch output the checks compare with (each component's on the parity inputs, the end-to-end image) is
    computed first; then, with `release_weights` (the export stage's), the pipeline's weights are freed (it is unusable
    afterwards) before onnxruntime loads the exported graphs, so that the two copies of the model are never in memory
    together. Raises `SdpipeError` (and writes nothing) when a component or the end-to-end image is out of
    `settings.tolerance`.
    """
    providers = execution_providers()
    if settings.optimize and "CUDAExecutionProvider" not in providers:
        raise SdpipeError(
            "export.optimize is true: the fused graphs run only on onnxruntime's CUDAExecutionProvider, which this "
            f"onnxruntime does not have (providers: {providers}); install onnxruntime-gpu on a CUDA machine or set "
            "export.optimize: false"
        )
    if settings.exporter == "dynamo":
        require_onnxscript()
    if pipe.device.type != "cpu" or pipe.unet.dtype != torch.float32:
        pipe = pipe.to("cpu", torch.float32)  # exported and checked in fp32 on the CPU; fp16 is a graph conversion
    for module in torch_modules(pipe):
        module.eval()
    tolerance = getattr(settings.tolerance, settings.precision)
    report = {
        "model": model,
        "exporter": settings.exporter,
        "opset": settings.opset,
        "precision": settings.precision,
        "optimize": settings.optimize,
        "provider": providers[0],
        "tolerance": tolerance,
        "components": {},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        scratch = tmp.parent / "raw"  # the torch exports before rewriting; atomic_path removes it with its temp folder
        fused, cases = {}, {}
        for component, spec in graph_specs(pipe).items():
            log(f"export: {component}")
            fused[component] = export_component(pipe, component, spec, tmp / component, scratch, settings, seed)
            cases[component] = parity_cases(pipe, component, spec, seed)
        write_pipeline_files(pipe, tmp)
        torch_image = None
        if settings.check_steps:
            torch_image = torch_generate(pipe, settings.check_prompt, seed=seed, steps=settings.check_steps)
        if release_weights:
            for module in torch_modules(pipe):
                module.to("meta")  # frees the weights: the caller's pipeline is unusable from here on
        for component, component_cases in cases.items():
            result = check_component(tmp / component / "model.onnx", component_cases, providers)
            result["fused_operators"] = fused[component]
            report["components"][component] = result
            if result["relative_error"] > tolerance:
                raise SdpipeError(
                    f"export: {component} is out of tolerance: relative error {result['relative_error']:.3g} > "
                    f"export.tolerance.{settings.precision} = {tolerance:g} (max abs error "
                    f"{result['max_abs_error']:.3g}); nothing was written"
                )
        if settings.check_steps:
            report["generation"] = check_generation(tmp, settings, seed, providers, torch_image)
            difference = report["generation"]["mean_abs_pixel_diff"]
            if difference > settings.tolerance.image:
                raise SdpipeError(
                    f"export: the onnxruntime image differs from the PyTorch one by {difference:.3g} (mean abs pixel "
                    f"difference) > export.tolerance.image = {settings.tolerance.image:g}; nothing was written"
                )
        (tmp / "parity.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def export_component(
    pipe, component: str, spec: GraphSpec, folder: Path, scratch: Path, settings: ExportParams, seed: int
) -> dict:
    """Writes `<folder>/model.onnx` (and `config.json`); returns the counts of fused operators (when optimized).

    The torch export goes to `<scratch>/<component>/` first: the TorchScript exporter writes a model over 2 GB
    as one file per tensor, which `save_onnx` gathers into one `weights.pb`."""
    raw = scratch / component / "model.onnx"
    raw.parent.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    inputs = example_inputs(pipe, component, generator)  # batch 2, so that the trace keeps the batch axis
    torch_export(spec, inputs, raw, settings.exporter, settings.opset)
    fused = {}
    folder.mkdir()
    if not settings.optimize and settings.precision == "fp32" and has_external_data(raw):
        gather_external_data(raw, folder / "model.onnx")  # over 2 GB: never the whole model in memory
    else:
        if settings.optimize:
            model, fused = optimize_for_cuda(raw, component, fp16=settings.precision == "fp16")
        else:
            model = onnx.load(str(raw))
            if settings.precision == "fp16":
                model = convert_to_fp16(model)
        save_onnx(model, folder / "model.onnx", always_external=settings.external_data == "always")
    config = config_dict(component_module(pipe, component))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fused


def torch_export(spec: GraphSpec, inputs: dict, path: Path, exporter: str, opset: int) -> None:
    """`torch.onnx.export` with the chosen exporter; dynamic axes as in `spec`."""
    dynamic_axes = {**spec.inputs, **spec.outputs}
    with torch.no_grad(), warnings.catch_warnings():
        # Known noise: the TorchScript exporter's deprecation notice and its tracer's notes on python branches
        # (diffusers' shape checks), which the parity check's second shape covers.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")  # CLIP's pooled output: no negative indices
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            spec.module,
            tuple(inputs.values()),
            str(path),
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=exporter == "dynamo",
            **({"verbose": False, "external_data": True} if exporter == "dynamo" else {}),
        )


def require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise SdpipeError(
            "export.exporter is 'dynamo', which needs the onnxscript package (pip install onnxscript); "
            "or use export.exporter: torchscript"
        ) from None


def save_onnx(model: onnx.ModelProto, path: Path, always_external: bool) -> None:
    """Saves `model`, with its weights in one external `weights.pb` when asked or when over protobuf's limit."""
    if always_external or initializer_bytes(model) > PROTOBUF_LIMIT:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE
        )
    else:
        onnx.save_model(model, str(path))


def has_external_data(path: Path) -> bool:
    """Whether the ONNX model at `path` keeps tensors in files beside it (the TorchScript exporter does over 2 GB)."""
    model = onnx.load(str(path), load_external_data=False)
    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)


def gather_external_data(raw: Path, path: Path) -> None:
    """Writes the model at `raw`, whose tensors are files beside it, to `path` with every external tensor in one
    `weights.pb` beside it, copying one tensor at a time (`onnx.load` would hold every weight in memory at once)."""
    model = onnx.load(str(raw), load_external_data=False)
    with open(path.parent / EXTERNAL_DATA_FILE, "wb") as weights:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            with open(raw.parent / info["location"], "rb") as source:
                source.seek(int(info.get("offset", 0)))
                data = source.read(int(info["length"])) if "length" in info else source.read()
            offset = weights.tell()
            weights.write(data)
            del tensor.external_data[:]
            for key, value in (("location", EXTERNAL_DATA_FILE), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(path))


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            total += 4 * (len(tensor.float_data) + len(tensor.int32_data))
            total += 8 * (len(tensor.int64_data) + len(tensor.double_data))
    return total


def config_dict(module) -> dict:
    """A module's config as plain JSON (a diffusers config, or a transformers config's dict), without the path it
    was loaded from."""
    config = module.config
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data.pop("_name_or_path", None)
    return json.loads(json.dumps(data, default=str))


def write_pipeline_files(pipe, folder: Path) -> None:
    """`tokenizer/`, `scheduler/` and the `model_index.json` of diffusers' `OnnxStableDiffusionPipeline`; for SDXL
    also `tokenizer_2/`, and the PyTorch pipeline's own `model_index.json`, as optimum's SDXL export writes it."""
    import diffusers

    family = pipeline_family(pipe)
    for name in family.tokenizers:
        save_tokenizer(getattr(pipe, name), folder / name)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    if family is SDXL:
        model_index = {key: value for key, value in dict(pipe.config).items() if key != "_name_or_path"}
        model_index = {**model_index, "_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__}
        (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True, default=list) + "\n")
        return
    onnx_model = ["diffusers", "OnnxRuntimeModel"]
    model_index = {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "text_encoder": onnx_model,
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__],
        "unet": onnx_model,
        "vae_decoder": onnx_model,
        "vae_encoder": onnx_model,
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Parity


@torch.no_grad()
def parity_cases(pipe, component: str, spec: GraphSpec, seed: int) -> list[tuple[dict, tuple]]:
    """The parity check's inputs for `component` (the export shape and a wider one with another batch size) and the
    module's outputs for them, as numpy arrays."""
    generator = torch.Generator().manual_seed(seed + 1)
    cases = []
    for batch, width_factor, timesteps in PARITY_CASES:
        inputs = example_inputs(pipe, component, generator, batch, width_factor, timesteps)
        expected = spec.module(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        arrays = {name: tensor.numpy() for name, tensor in inputs.items()}
        cases.append((arrays, tuple(output.float().numpy() for output in expected)))
    return cases


def check_component(path: Path, cases: list[tuple[dict, tuple]], providers: list[str]) -> dict:
    """Largest absolute and relative error of the exported component against its module's outputs (`parity_cases`).

    The relative error is the largest absolute difference over the largest absolute reference value.
    """
    session = inference_session(path, providers)
    max_abs, relative, shapes = 0.0, 0.0, []
    for inputs, expected in cases:
        actual = session.run(None, inputs)
        for reference, output in zip(expected, actual, strict=True):
            error = float(np.abs(output.astype(np.float32) - reference).max())
            max_abs = max(max_abs, error)
            relative = max(relative, error / max(float(np.abs(reference).max()), 1e-12))
        shapes.append({name: list(array.shape) for name, array in inputs.items()})
    return {"max_abs_error": max_abs, "relative_error": relative, "input_shapes": shapes}


def check_generation(folder: Path, settings: ExportParams, seed: int, providers: list[str], torch_image: np.ndarray) -> dict:
    """One image from onnxruntime against the PyTorch pipeline's (`torch_generate`), same prompt, seed and scheduler."""
    log(f"export: end-to-end check, {settings.check_steps} steps")
    height, width = torch_image.shape[1:3]  # the size `torch_generate` drew at
    onnx_image = load_onnx_pipeline(folder, providers)(
        settings.check_prompt, seed=seed, steps=settings.check_steps, guidance_scale=CHECK_GUIDANCE, height=height,
        width=width,
    )
    difference = np.abs(onnx_image - torch_image)
    return {
        "prompt": settings.check_prompt,
        "steps": settings.check_steps,
        "seed": seed,
        "mean_abs_pixel_diff": float(difference.mean()),
        "max_abs_pixel_diff": float(difference.max()),
    }


@torch.no_grad()
def torch_generate(pipe, prompt: str, seed: int, steps: int, guidance_scale: float = CHECK_GUIDANCE) -> np.ndarray:
    """The PyTorch pipeline's image, [1, height, width, 3] in [0, 1], latents drawn like `OnnxStableDiffusion`'s."""
    pipe.set_progress_bar_config(disable=True)
    side = check_latent_size(pipe) * pipe.vae_scale_factor
    return pipe(
        prompt,
        height=side,
        width=side,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
