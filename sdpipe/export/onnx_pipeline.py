"""Text-to-image with onnxruntime over an exported folder (see `sdpipe.export.onnx`).

`OnnxStableDiffusion` takes the same steps as diffusers' `StableDiffusionPipeline`: the same tokenization,
classifier-free guidance, scheduler (loaded from the folder, stepped in torch) and initial latents (drawn from
a CPU `torch.Generator` seeded with `seed`), so that with the same seed it gives the PyTorch pipeline's image
up to the export's numerical error. Unlike diffusers' deprecated `OnnxStableDiffusionPipeline` it reads the
latent size and the VAE scaling factor from the folder's configs instead of assuming SD 1.5's (8x, 0.18215).
`OnnxStableDiffusionXL` does the same for an SDXL export as diffusers' `StableDiffusionXLPipeline` (both text
encoders' penultimate hidden states, the pooled embedding, the size and crop time ids, zeros as the negative
conditioning when no negative prompt is given); `load_onnx_pipeline` picks the one a folder needs.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdpipe.errors import SdpipeError
from sdpipe.families import SDXL, family_of_class
from sdpipe.families.base import token_ids

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def execution_providers() -> list[str]:
    """onnxruntime's CUDAExecutionProvider when this onnxruntime build has it (onnxruntime-gpu), else the CPU's."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def inference_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An onnxruntime session for one exported `model.onnx` (its external `weights.pb`, if any, sits beside it);
    `threads` caps the CPU threads of one operator (onnxruntime's default: one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initializers or provider placement
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers or execution_providers())


class OnnxComponent:
    """One exported model: called with numpy arrays by input name, cast to the dtypes the graph declares."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None):
        self.session = inference_session(path, providers, threads)
        self.input_types = {node.name: ORT_TYPES[node.type] for node in self.session.get_inputs()}
        self.input_ranks = {node.name: len(node.shape) for node in self.session.get_inputs()}
        self.output_names = [node.name for node in self.session.get_outputs()]
        self.config = json.loads((Path(path).parent / "config.json").read_text())

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feeds = {name: np.asarray(value, dtype=self.input_types[name]) for name, value in inputs.items()}
        return [np.asarray(output, dtype=np.float32) for output in self.session.run(None, feeds)]

    def named(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs by name."""
        return dict(zip(self.output_names, self(**inputs), strict=True))


class OnnxStableDiffusion:
    """An exported Stable Diffusion folder run with onnxruntime (CUDA when available, else the CPU)."""

    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    default_guidance_scale = 7.5  # the diffusers pipeline's

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import diffusers
        from transformers import CLIPTokenizer

        folder = Path(folder)
        components = (*self.text_encoders, "unet", "vae_encoder", "vae_decoder")
        missing = [name for name in components if not (folder / name / "model.onnx").is_file()]
        if missing:
            raise SdpipeError(
                f"{folder}: not an sdpipe ONNX export (no {', '.join(f'{name}/model.onnx' for name in missing)}); "
                "expected the folder `sdpipe` export writes under <paths.export>/onnx/<name>/"
            )
        self.providers = providers or execution_providers()
        self.components = {name: OnnxComponent(folder / name / "model.onnx", self.providers, threads) for name in components}
        self.unet, self.vae_decoder = self.components["unet"], self.components["vae_decoder"]
        self.tokenizer_objects = [CLIPTokenizer.from_pretrained(folder / name) for name in self.tokenizers]
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        self.latent_channels = self.unet.config["in_channels"]
        self.latent_size = self.unet.config["sample_size"]
        vae_config = self.vae_decoder.config
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.scaling_factor = vae_config.get("scaling_factor", 0.18215)

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """The text encoder's last hidden state for each prompt, padded to the tokenizer's maximum length."""
        return self.components["text_encoder"](input_ids=token_ids(self.tokenizer_objects[0], prompts).numpy())[0]

    def unet_conditioning(self, prompts: list[str], negatives: list[str] | None, guided: bool, size: tuple) -> dict:
        """The UNet's conditioning inputs for the prompts, after the negative ones when `guided` (the empty prompt's
        when `negatives` is None)."""
        if guided:
            prompts = (negatives or [""] * len(prompts)) + prompts
        return {"encoder_hidden_states": self.encode_prompts(prompts)}

    def __call__(
        self,
        prompt: str | list[str],
        *,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Images for the prompts as an array [batch, height, width, 3] in [0, 1]. Without a negative prompt, the
        empty prompt is the negative one (SDXL: zeros, as its pipeline's `force_zeros_for_empty_prompt`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.latent_size * self.vae_scale_factor
        width = width or self.latent_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise SdpipeError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        guided = guidance_scale > 1.0
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        conditioning = self.unet_conditioning(prompts, negatives and list(negatives), guided, (height, width))

        generator = torch.Generator().manual_seed(seed)
        shape = (len(prompts), self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        self.scheduler.set_timesteps(steps)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self.scheduler_step_kwargs(generator)
        timestep_rank = self.unet.input_ranks["timestep"]  # SD: [1], as diffusers' ONNX pipeline; SDXL: a scalar
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(
                sample=model_input.numpy(),
                timestep=np.array(float(t), dtype=np.float32).reshape((1,) * timestep_rank),
                **conditioning,
            )[0]
            noise_pred = torch.from_numpy(noise_pred)
            if guided:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        image = self.vae_decoder(latent_sample=(latents / self.scaling_factor).numpy())[0]
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    def scheduler_step_kwargs(self, generator: torch.Generator) -> dict:
        """What diffusers' pipeline passes to `scheduler.step`: eta 0 for DDIM, the generator for ancestral samplers."""
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs


class OnnxStableDiffusionXL(OnnxStableDiffusion):
    """An exported SDXL folder (optimum's layout) run with onnxruntime, as diffusers' `StableDiffusionXLPipeline`."""

    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    default_guidance_scale = 5.0

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(folder, providers, threads)
        model_index = json.loads((Path(folder) / "model_index.json").read_text())
        self.zeros_for_empty_prompt = model_index.get("force_zeros_for_empty_prompt", True)

    def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The context (both encoders' penultimate hidden states, side by side) and the pooled embedding."""
        contexts, pooled = [], None
        for name, tokenizer in zip(self.text_encoders, self.tokenizer_objects):
            encoder = self.components[name]
            outputs = encoder.named(input_ids=token_ids(tokenizer, prompts).numpy())
            contexts.append(outputs[f"hidden_states.{encoder.config['num_hidden_layers'] - 1}"])
            pooled = outputs.get("text_embeds", pooled)
        return np.concatenate(contexts, axis=-1), pooled

    def unet_conditioning(self, prompts: list[str], negatives: list[str] | None, guided: bool, size: tuple) -> dict:
        context, pooled = self.encode_prompts(prompts)
        if guided:
            if negatives is None and self.zeros_for_empty_prompt:
                negative_context, negative_pooled = np.zeros_like(context), np.zeros_like(pooled)
            else:
                negative_context, negative_pooled = self.encode_prompts(negatives or [""] * len(prompts))
            context, pooled = np.concatenate([negative_context, context]), np.concatenate([negative_pooled, pooled])
        # original size, crop top-left, target size: the image's own size, uncropped (the pipeline's defaults)
        time_ids = np.array([[*size, 0, 0, *size]] * len(context), dtype=np.float32)
        return {"encoder_hidden_states": context, "text_embeds": pooled, "time_ids": time_ids}


def load_onnx_pipeline(folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """The runner an exported folder needs: `OnnxStableDiffusionXL` for an SDXL export, else `OnnxStableDiffusion`."""
    index = Path(folder) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    runner = OnnxStableDiffusionXL if family_of_class(class_name) is SDXL else OnnxStableDiffusion
    return runner(folder, providers, threads)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[batch, height, width, 3] floats in [0, 1] as PIL images (rounded like diffusers' `numpy_to_pil`)."""
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
