"""The one place that resolves the base model, the device and the precision.

`base.base_model` may be any of three kinds of source, told apart by `classify_model_source`:

- `folder`: a local diffusers folder (it has `model_index.json`);
- `single_file`: an original-layout `.safetensors` checkpoint, whose architecture comes from the local
  diffusers folder `base.base_model_config` (see `sdpipe.models.single_file`);
- `hub`: a Hugging Face Hub id `owner/name`, read from the local cache first, downloaded only when the hub
  can be reached.

Legacy pickled checkpoints (`.ckpt`, `.pt`, ...) are refused, never unpickled: unpickling runs code. For the
same reason folders and hub models are read from their `.safetensors` weights only (`use_safetensors=True`).
Weights that do not fit their config (missing, mis-shaped: another architecture or SD version) and folders
without a component are refused with an `SdpipeError` naming the params key, never loaded half-initialized.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import torch
from rich.markup import escape
from safetensors import SafetensorError

from sdpipe.errors import SdpipeError
from sdpipe.families import ModelFamily, folder_family, single_file_family
from sdpipe.progress import log

ModelSource = Literal["folder", "single_file", "hub"]
T = TypeVar("T")

BASE_MODEL_KEY = "base.base_model"
SAFETENSORS_SUFFIXES = (".safetensors",)
LEGACY_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# What a diffusers Stable Diffusion folder must hold, per component: each of these file groups.
REQUIRED_FILES = {
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "text_encoder_2": (("config.json",),),
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "tokenizer_2": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "scheduler": (("scheduler_config.json",),),
}
TORCH_SIZE = r"torch\.Size\((\[[^\]]*\])\)"  # `torch.Size([64, 1024])`, capturing `[64, 1024]`
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(device: str) -> torch.device:
    """`base.device` as a torch device: `auto` is CUDA when present, else MPS when present, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SdpipeError(f"base.device is {device!r} but CUDA is not available here; use `auto` or `cpu`")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SdpipeError(
                f"base.device is {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
        return resolved
    if device == "mps" and not torch.backends.mps.is_available():
        raise SdpipeError("base.device is 'mps' but MPS (Apple GPU) is not available here; use `auto` or `cpu`")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`base.precision` as a torch dtype for `device`: `auto` is bf16 on CUDA that supports it, fp16 on other
    CUDA and fp32 on the CPU and MPS. Half precision on the CPU is refused (too slow, and not supported)."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in PRECISIONS:
        raise SdpipeError(f"base.precision is {precision!r}; expected one of auto, {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision != "fp32":
        raise SdpipeError(
            f"base.precision is {precision!r} but the device is the CPU: half precision training on the CPU is "
            "not supported; use `fp32` or `auto`"
        )
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SdpipeError("base.precision is 'bf16' but this CUDA device does not support bf16; use `fp16` or `auto`")
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------------------
# What kind of model source


def classify_model_source(base_model: str, *, key: str = BASE_MODEL_KEY) -> ModelSource:
    """Whether `base_model` is a local diffusers folder, a single-file checkpoint or a hub id.

    Raises `SdpipeError` (naming `key`, the params key it came from) for a folder without `model_index.json`,
    a legacy pickled checkpoint, a missing path, or something that is none of the three.
    """
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise SdpipeError(
                f"{key} {base_model!r} is a folder without model_index.json; expected a diffusers Stable Diffusion "
                "folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return "folder"
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            return "single_file"
        if suffix in LEGACY_SUFFIXES:
            raise SdpipeError(
                f"{key} {base_model!r} is a legacy pickled checkpoint ({suffix}); it is not loaded because "
                "unpickling can run arbitrary code. Convert it to .safetensors once, in an environment you trust "
                f"(e.g. with diffusers' conversion scripts), and point {key} at the .safetensors file"
            )
        raise SdpipeError(
            f"{key} {base_model!r} is a file but not a .safetensors checkpoint; expected a diffusers folder, a "
            ".safetensors file or a hub id (owner/name)"
        )
    if looks_like_path(base_model):
        raise SdpipeError(
            f"{key} {base_model!r}: no such file or folder (expected a diffusers folder, a .safetensors file or a "
            "hub id owner/name)"
        )
    if HUB_ID.match(base_model):
        return "hub"
    raise SdpipeError(f"{key} {base_model!r} is not an existing folder or file, nor a Hugging Face Hub id (owner/name)")


def model_family(base_model: str, config: str | None = None, *, key: str = BASE_MODEL_KEY) -> ModelFamily:
    """The model family of `base_model`: from a folder's (or a cached hub model's) `model_index.json`, or from a
    single file's tensor names, which must agree with its `config` folder's family."""
    source = classify_model_source(base_model, key=key)
    if source == "single_file":
        from sdpipe.models.single_file import check_safetensors_file

        path = Path(base_model).expanduser()
        family = single_file_family(check_safetensors_file(path))
        if config is not None:
            config_family = folder_family(Path(config).expanduser(), key="base.base_model_config")
            if config_family is not family:
                raise SdpipeError(
                    f"{key} {base_model!r} is a {family.title} checkpoint but base.base_model_config {config!r} is a "
                    f"{config_family.title} folder; the config folder must describe the file's architecture"
                )
        return family
    if source == "folder":
        return folder_family(Path(base_model).expanduser(), key=key)

    def model_index(local_files_only: bool) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(base_model, "model_index.json", local_files_only=local_files_only)

    return folder_family(Path(load_pretrained(base_model, source, model_index, "model_index.json", key)).parent, key=key)


def looks_like_path(text: str) -> bool:
    """Whether a string that names nothing on disk was meant as a path rather than a hub id `owner/name`."""
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    if text.count("/") > 1:
        return True
    return text.lower().endswith(SAFETENSORS_SUFFIXES + LEGACY_SUFFIXES)


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_pipeline(
    base_model: str,
    config: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    components: dict | None = None,
    key: str = BASE_MODEL_KEY,
):
    """The pipeline of `base_model` (a folder, single file or hub id) in its family's class
    (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`), in `dtype` on `device`.

    `config` is the local diffusers folder that describes a single-file checkpoint's architecture
    (`base.base_model_config`); it is required for single files and ignored otherwise. `components`
    replaces loaded components (`{"unet": my_unet}`). The safety checker is never loaded.
    """
    import diffusers

    components = dict(components or {})
    source = classify_model_source(base_model, key=key)
    family = model_family(base_model, config if source == "single_file" else None, key=key)
    if source == "single_file":
        from sdpipe.models.single_file import load_single_file_pipeline

        if config is None:
            raise SdpipeError(
                f"{key} {base_model!r} is a single-file checkpoint, so base.base_model_config must name a local "
                "diffusers folder of the same architecture (its configs, tokenizer and scheduler are used)"
            )
        pipe = load_single_file_pipeline(Path(base_model).expanduser(), config, torch_dtype=dtype, **components)
    else:
        components = {**family.pipeline_kwargs, **components}
        if source == "folder":
            for name in [name for name in family.components if name not in components]:
                require_component(base_model, name, key)
        # Loaded one by one so that each is checked against its config: diffusers' pipeline loader would let a
        # text encoder with missing weights through, randomly initialized.
        for name, load_component in (("unet", load_unet), ("vae", load_vae)):
            if name not in components:
                components[name] = load_component(base_model, dtype=dtype, device=device, key=key)
        for name in family.text_encoders:
            if name not in components:
                components[name] = load_text_encoder(base_model, dtype=dtype, device=device, key=key, subfolder=name)
        pipeline_class = getattr(diffusers, family.pipeline_class)

        def load(local_files_only: bool):
            return pipeline_class.from_pretrained(
                model_location(base_model, source),
                torch_dtype=dtype,
                local_files_only=local_files_only,
                use_safetensors=True,
                **components,
            )

        pipe = load_pretrained(base_model, source, load, "pipeline", key)
    return pipe.to(device)


def load_vae(
    base_model: str,
    config: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    key: str = BASE_MODEL_KEY,
):
    """The `AutoencoderKL` of `base_model`, without building the whole pipeline (except for single files)."""
    from diffusers import AutoencoderKL

    return load_model_component(AutoencoderKL, "vae", base_model, config, dtype, device, key)


def load_unet(
    base_model: str,
    config: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    key: str = BASE_MODEL_KEY,
):
    """The `UNet2DConditionModel` of `base_model`."""
    from diffusers import UNet2DConditionModel

    return load_model_component(UNet2DConditionModel, "unet", base_model, config, dtype, device, key)


def load_text_encoder(
    base_model: str,
    config: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    key: str = BASE_MODEL_KEY,
    subfolder: str = "text_encoder",
):
    """The text encoder `subfolder` of `base_model` (SDXL's second is `text_encoder_2`), in its family's class."""
    import transformers

    family = model_family(base_model, config, key=key)
    if subfolder not in family.text_encoders:
        raise SdpipeError(f"{key} {base_model!r} is a {family.title} model; it has no {subfolder}")
    class_name = family.text_encoder_classes[family.text_encoders.index(subfolder)]
    return load_model_component(getattr(transformers, class_name), subfolder, base_model, config, dtype, device, key)


def load_tokenizer(base_model: str, config: str | None = None, *, key: str = BASE_MODEL_KEY, subfolder: str = "tokenizer"):
    """The CLIP tokenizer `subfolder` of `base_model` (of the `config` folder for a single-file checkpoint)."""
    from transformers import CLIPTokenizer

    return load_config_component(CLIPTokenizer, subfolder, base_model, config, key)


def load_noise_scheduler(base_model: str, config: str | None = None, *, key: str = BASE_MODEL_KEY):
    """A `DDPMScheduler` with the model's scheduler config: the noise schedule training uses."""
    from diffusers import DDPMScheduler

    return load_config_component(DDPMScheduler, "scheduler", base_model, config, key)


def load_model_component(cls, subfolder: str, base_model, config, dtype, device, key):
    """One model of the pipeline, on `device` in `dtype`, in eval mode."""
    source = classify_model_source(base_model, key=key)
    if source == "single_file":
        # The file holds the UNet, VAE and text encoder together; diffusers splits them while building the pipeline.
        return getattr(load_pipeline(base_model, config, dtype=dtype, device=device, key=key), subfolder)

    if source == "folder":
        require_component(base_model, subfolder, key)

    def load(local_files_only: bool):
        return cls.from_pretrained(
            model_location(base_model, source),
            subfolder=subfolder,
            torch_dtype=dtype,
            local_files_only=local_files_only,
            use_safetensors=True,
            output_loading_info=True,
        )

    model, loading_info = load_pretrained(base_model, source, load, subfolder, key)
    check_loading_info(loading_info, base_model, subfolder, key)
    return model.to(device).eval()


def load_config_component(cls, subfolder: str, base_model, config, key):
    """A weightless component (tokenizer, scheduler); single files take it from the `config` folder."""
    source = classify_model_source(base_model, key=key)
    if source == "single_file":
        if config is None:
            raise SdpipeError(
                f"{key} {base_model!r} is a single-file checkpoint, so base.base_model_config must name a local "
                f"diffusers folder (its {subfolder}/ is used)"
            )
        base_model, source, key = config, "folder", "base.base_model_config"
    if source == "folder":
        require_component(base_model, subfolder, key)

    def load(local_files_only: bool):
        return cls.from_pretrained(
            model_location(base_model, source), subfolder=subfolder, local_files_only=local_files_only
        )

    return load_pretrained(base_model, source, load, subfolder, key)


def model_location(base_model: str, source: ModelSource) -> str:
    """What to pass to `from_pretrained`: the folder path (with `~` expanded) or the hub id."""
    return str(Path(base_model).expanduser()) if source == "folder" else base_model


def require_component(folder: str, subfolder: str, key: str) -> None:
    """Refuses a diffusers folder without `subfolder` or its files (transformers would quietly make an empty
    tokenizer of a missing tokenizer folder)."""
    path = Path(folder).expanduser() / subfolder
    groups = REQUIRED_FILES.get(subfolder, ())
    if groups and not any(all((path / name).is_file() for name in group) for group in groups):
        expected = " or ".join(" + ".join(group) for group in groups)
        raise SdpipeError(
            f"{key} {folder!r}: cannot load its {subfolder}: the folder has no {subfolder}/{expected}; a diffusers "
            "Stable Diffusion folder has model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )


def load_pretrained(base_model: str, source: ModelSource, load: Callable[[bool], T], what: str, key: str) -> T:
    """Runs `load(local_files_only)`: a folder locally; a hub id from the cache first, then from the hub.

    Files that cannot be used (missing, corrupt, or shaped for another architecture) become an `SdpipeError`.
    """
    try:
        if source == "folder":
            return load(True)
        try:
            return load(True)
        except OSError:
            if hub_offline():
                raise SdpipeError(not_cached_message(base_model, key)) from None
        try:
            return load(False)
        except OSError as error:
            if is_connection_error(error):
                raise SdpipeError(not_cached_message(base_model, key)) from None
            raise SdpipeError(
                f"{key} {base_model!r} was taken as a Hugging Face Hub id but its {what} could not be loaded: "
                f"{str(error).rstrip('.')}{safetensors_hint(error)}"
            ) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        reason = unusable_weights_reason(error)
        if reason is None:
            raise
        raise SdpipeError(f"{key} {base_model!r}: cannot load its {what}: {reason}") from None


def unusable_weights_reason(error: BaseException) -> str | None:
    """What a loading error says about the model files, or None when it is not about them."""
    message = str(error).strip().rstrip(".")
    if isinstance(error, SafetensorError):
        return f"a .safetensors file is truncated or corrupt ({message})"
    mismatch = shape_mismatch(message)
    if mismatch:
        return f"its weights do not fit its config (another architecture or Stable Diffusion version?): {mismatch}"
    if "Unable to load weights from checkpoint file" in message:
        return f"{message}: truncated or corrupt"
    if isinstance(error, (OSError, ValueError)):  # diffusers' and transformers' messages name the file at fault
        return f"{message}{safetensors_hint(error)}"
    return None


def shape_mismatch(message: str) -> str | None:
    """Which weight has a shape its config does not expect, from a diffusers or transformers error message."""
    shapes = re.search(rf"(\S+) expected shape {TORCH_SIZE}, but got {TORCH_SIZE}", message)
    if shapes:
        return f"{shapes[1]} has shape {shapes[3]} in the file but {shapes[2]} in the config"
    if "mismatched_sizes" in message or "size mismatch" in message:
        return "weights of other shapes than the config's (see the report above)"
    return None


def safetensors_hint(error: BaseException) -> str:
    if not re.search(r"no file named \S+\.safetensors", str(error)):
        return ""
    return (
        ". sdpipe reads only .safetensors weights (loading pickled .bin/.ckpt files can run code); convert them "
        "once in an environment you trust"
    )


def check_loading_info(info: dict, base_model: str, what: str, key: str) -> None:
    """Refuses weights files that leave part of the model uninitialized or have the wrong shapes (the loaders would
    go on with random weights); warns about weights the config has no place for."""
    missing = sorted(map(str, info.get("missing_keys") or []))
    mismatched = sorted(str(item[0] if isinstance(item, tuple) else item) for item in info.get("mismatched_keys") or [])
    problems = [f"{len(names)} weight(s) {label}: {short_list(names)}"
                for names, label in ((missing, "missing"), (mismatched, "of another shape")) if names]
    if problems:
        raise SdpipeError(
            f"{key} {base_model!r}: its {what} weights do not fit its config ({'; '.join(problems)}); the files are "
            "incomplete, or of another architecture or Stable Diffusion version"
        )
    unexpected = sorted(map(str, info.get("unexpected_keys") or []))
    if unexpected:
        warning = f"{key} {base_model}: its {what} config has no place for {short_list(unexpected)}; ignored"
        log(f"[yellow]warning[/] {escape(warning)}")


def short_list(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def hub_offline() -> bool:
    """Whether Hugging Face Hub downloads are switched off (`HF_HUB_OFFLINE`, or the older `TRANSFORMERS_OFFLINE`)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in names)


def is_connection_error(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the hub could not be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
            return True
        if any(word in type(error).__name__ for word in ("Connect", "Timeout", "Network")):
            return True
        error = error.__cause__ or error.__context__
    return False


def not_cached_message(base_model: str, key: str) -> str:
    return (
        f"{key} {base_model!r} is a Hugging Face Hub id that is not in the local cache and the hub cannot be "
        f"reached (offline); download it first or point {key} at a local diffusers folder or .safetensors file"
    )


# ---------------------------------------------------------------------------------------------------------
# Fingerprint


def model_fingerprint(base_model: str, *, key: str = BASE_MODEL_KEY) -> str:
    """A short sha256 of the model's weights and configs, to key caches made from it.

    A folder hashes every `*.safetensors` and `*.json` file (hidden ones aside) by sorted relative path, a
    single file its bytes, a hub id the files of its cached snapshot.
    """
    source = classify_model_source(base_model, key=key)
    path = Path(base_model).expanduser()
    if source == "hub":
        path = cached_snapshot(base_model, key)
    if source == "single_file":
        files = [(path.name, path)]
    else:
        files = sorted(
            (file.relative_to(path).as_posix(), file)
            for pattern in ("*.safetensors", "*.json")
            for file in path.rglob(pattern)
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
    # Keyed by inode, size and modification time so that a process hashes a model once, not once per dataset.
    listing = tuple((name, str(file.resolve()), *file_identity(file)) for name, file in files)
    return hash_files(listing)


def file_identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=16)
def hash_files(listing: tuple[tuple, ...]) -> str:
    digest = hashlib.sha256()
    for name, file, *_ in listing:
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(file_sha256(Path(file)) + b"\0")
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def cached_snapshot(repo_id: str, key: str) -> Path:
    """The folder of the cached copy of a hub model (never downloads)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except OSError:
        raise SdpipeError(not_cached_message(repo_id, key)) from None
