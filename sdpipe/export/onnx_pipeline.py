"""Text-to-image with onnxruntime over an exported folder (see `sdpipe.export.onnx`).

`OnnxStableDiffusion` takes the same steps as diffusers' `StableDiffusionPipeline`: the same tokenization,
classifier-free guidance, scheduler (loaded from the folder, stepped in torch) and initial latents (drawn from
a CPU `torch.Generator` seeded with `seed`), so that with the same seed it gives the PyTorch pipeline's image
up to the export's numerical error. Unlike diffusers' deprecated `OnnxStableDiffusionPipeline` it reads the
latent size and the VAE scaling factor from the folder's configs instead of assuming SD 1.5's (8x, 0.18215).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdpipe.errors import SdpipeError

COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
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

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        feeds = {name: np.asarray(value, dtype=self.input_types[name]) for name, value in inputs.items()}
        return [np.asarray(output, dtype=np.float32) for output in self.session.run(None, feeds)]


class OnnxStableDiffusion:
    """An exported Stable Diffusion folder run with onnxruntime (CUDA when available, else the CPU)."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import diffusers
        from transformers import CLIPTokenizer

        folder = Path(folder)
        missing = [name for name in COMPONENTS if not (folder / name / "model.onnx").is_file()]
        if missing:
            raise SdpipeError(
                f"{folder}: not an sdpipe ONNX export (no {', '.join(f'{name}/model.onnx' for name in missing)}); "
                "expected the folder `sdpipe` export writes under <paths.export>/onnx/<name>/"
            )
        self.providers = providers or execution_providers()
        self.text_encoder, self.unet, self.vae_encoder, self.vae_decoder = (
            OnnxComponent(folder / name / "model.onnx", self.providers, threads) for name in COMPONENTS
        )
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        vae_config = json.loads((folder / "vae_decoder" / "config.json").read_text())
        self.latent_channels = unet_config["in_channels"]
        self.latent_size = unet_config["sample_size"]
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.scaling_factor = vae_config.get("scaling_factor", 0.18215)

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """The text encoder's last hidden state for each prompt, padded to the tokenizer's maximum length."""
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids
        return self.text_encoder(input_ids=input_ids)[0]

    def __call__(
        self,
        prompt: str | list[str],
        *,
        seed: int = 0,
        steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Images for the prompts as an array [batch, height, width, 3] in [0, 1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        height = height or self.latent_size * self.vae_scale_factor
        width = width or self.latent_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise SdpipeError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        guided = guidance_scale > 1.0
        prompt_embeds = self.encode_prompts(negatives + prompts if guided else prompts)

        generator = torch.Generator().manual_seed(seed)
        shape = (len(prompts), self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        self.scheduler.set_timesteps(steps)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self.scheduler_step_kwargs(generator)
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(
                sample=model_input.numpy(),
                timestep=np.array([t], dtype=np.float32),
                encoder_hidden_states=prompt_embeds,
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


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[batch, height, width, 3] floats in [0, 1] as PIL images (rounded like diffusers' `numpy_to_pil`)."""
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
