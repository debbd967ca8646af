"""Resolving the base model (folder, single file, hub id), the device and the precision."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sdpipe.errors import SdpipeError
from sdpipe.models import loading
from sdpipe.models.loading import (
    classify_model_source,
    load_noise_scheduler,
    load_pipeline,
    load_tokenizer,
    load_unet,
    load_vae,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)


@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def one_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --- device and precision ---------------------------------------------------------------------------------


def test_auto_device_falls_back_to_cpu(no_accelerator):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_device_prefers_cuda_then_mps(monkeypatch, one_cuda_device):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_missing_accelerator_is_a_user_error(no_accelerator, device):
    with pytest.raises(SdpipeError, match=rf"base\.device is '{device}' but .* not available"):
        resolve_device(device)


def test_cuda_index_beyond_the_visible_devices(one_cuda_device):
    with pytest.raises(SdpipeError, match=r"base\.device is 'cuda:1' but only 1 CUDA device"):
        resolve_device("cuda:1")


def test_dtype_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32
    for precision in ("fp16", "bf16"):
        expected = rf"base\.precision is '{precision}'.*half precision .* CPU is not supported"
        with pytest.raises(SdpipeError, match=expected):
            resolve_dtype(precision, cpu)


def test_auto_dtype_on_cuda_depends_on_bf16_support(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("fp16", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    with pytest.raises(SdpipeError, match=r"base\.precision is 'bf16' .* does not support bf16"):
        resolve_dtype("bf16", cuda)


# --- classifying the source -------------------------------------------------------------------------------


def test_classify_each_kind(tiny_sd_dir, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not checked here")
    assert classify_model_source(str(tiny_sd_dir)) == "folder"
    assert classify_model_source(str(weights)) == "single_file"
    assert classify_model_source("runwayml/stable-diffusion-v1-5") == "hub"
    assert classify_model_source("some-owner/some.model_v2") == "hub"


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(SdpipeError, match=rf"base\.base_model '{tmp_path}' is a folder without model_index\.json"):
        classify_model_source(str(tmp_path))


@pytest.mark.parametrize(
    "missing",
    ["./no/such", "../nope", "/no/such/folder", "~/no-such-model-folder", "a/b/c", "model.safetensors", "x.ckpt"],
)
def test_missing_path_is_no_such_file(missing):
    with pytest.raises(SdpipeError, match=r"no such file or folder"):
        classify_model_source(missing)


@pytest.mark.parametrize("text", ["just-a-name", "with space/name", "owner/"])
def test_neither_path_nor_hub_id(text):
    with pytest.raises(SdpipeError, match=r"nor a Hugging Face Hub id"):
        classify_model_source(text)


def test_other_file_types_are_refused(tmp_path):
    notes = tmp_path / "model.txt"
    notes.write_text("hello")
    with pytest.raises(SdpipeError, match=r"not a \.safetensors checkpoint"):
        classify_model_source(str(notes))


def test_key_names_the_params_key(tmp_path):
    with pytest.raises(SdpipeError, match=r"merge\.models\[0\] './gone'"):
        classify_model_source("./gone", key="merge.models[0]")


class WritesMarker:
    """Unpickling this creates the marker file: it shows whether anything unpickled the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_legacy_pickle_is_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "unpickled.marker"
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(pickle.dumps({"state_dict": WritesMarker(marker)}))
    pickle.loads(pickle.dumps(WritesMarker(tmp_path / "control.marker")))
    assert (tmp_path / "control.marker").exists()  # the payload does work when unpickled

    expected = r"legacy pickled checkpoint .*unpickling can run arbitrary code.*safetensors"
    for load in (classify_model_source, load_pipeline, load_vae, model_fingerprint):
        with pytest.raises(SdpipeError, match=expected):
            load(str(checkpoint))
    assert not marker.exists()


# --- loading ------------------------------------------------------------------------------------------------


def test_load_pipeline_from_folder(tiny_sd_dir):
    pipe = load_pipeline(str(tiny_sd_dir))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"
    assert pipe.vae.config.latent_channels == 4


def test_load_pipeline_with_replaced_component(tiny_sd_dir):
    unet = load_unet(str(tiny_sd_dir))
    pipe = load_pipeline(str(tiny_sd_dir), components={"unet": unet})
    assert pipe.unet is unet


def test_load_components_from_folder(tiny_sd_dir):
    vae = load_vae(str(tiny_sd_dir))
    assert type(vae).__name__ == "AutoencoderKL" and not vae.training
    assert load_tokenizer(str(tiny_sd_dir))("a red circle").input_ids
    assert type(load_noise_scheduler(str(tiny_sd_dir))).__name__ == "DDPMScheduler"


def test_folder_with_missing_component_is_a_user_error(tiny_sd_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_sd_dir / "model_index.json", broken / "model_index.json")
    with pytest.raises(SdpipeError, match=r"base\.base_model .*broken.*: cannot load its vae"):
        load_vae(str(broken))


def test_single_file_needs_its_config(tiny_sd_dir, tmp_path):
    from sdpipe.models.single_file import save_single_file

    path = save_single_file(tiny_sd_dir, tmp_path / "tiny.safetensors")
    with pytest.raises(SdpipeError, match=r"base\.base_model_config must name a local diffusers folder"):
        load_pipeline(str(path))
    vae = load_vae(str(path), str(tiny_sd_dir))
    expected = load_vae(str(tiny_sd_dir))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(vae.state_dict()[name], tensor), name
    assert type(load_tokenizer(str(path), str(tiny_sd_dir))).__name__ == "CLIPTokenizer"


def test_uncached_hub_id_offline_is_a_clear_error(offline):
    expected = (
        r"base\.base_model 'sdpipe-tests/not-a-real-model' is a Hugging Face Hub id that is not in the local cache "
        r"and the hub cannot be reached \(offline\); download it first"
    )
    for load in (load_pipeline, load_vae, model_fingerprint):
        with pytest.raises(SdpipeError, match=expected):
            load("sdpipe-tests/not-a-real-model")


def test_network_errors_count_as_offline():
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert loading.is_connection_error(LocalEntryNotFoundError("cannot reach the hub"))
    try:
        try:
            raise ConnectionError("no route to host")
        except ConnectionError as cause:
            raise OSError("could not load") from cause
    except OSError as error:
        assert loading.is_connection_error(error)
    assert not loading.is_connection_error(OSError("owner/name does not appear to have a file named config.json"))


def test_hub_id_tries_the_cache_then_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    tries = []

    def cached_only(local_files_only):
        tries.append(local_files_only)
        if local_files_only:
            raise OSError("not in the cache")
        return "downloaded"

    assert loading.load_pretrained("owner/name", "hub", cached_only, "vae", "base.base_model") == "downloaded"
    assert tries == [True, False]

    def unreachable(local_files_only):
        raise OSError("cannot load") from ConnectionError("name resolution failed")

    with pytest.raises(SdpipeError, match=r"not in the local cache and the hub cannot be reached \(offline\)"):
        loading.load_pretrained("owner/name", "hub", unreachable, "vae", "base.base_model")

    def no_such_repo(local_files_only):
        raise OSError("owner/name is not a valid model identifier")

    expected = r"taken as a Hugging Face Hub id but its vae could not be loaded: owner/name is not"
    with pytest.raises(SdpipeError, match=expected):
        loading.load_pretrained("owner/name", "hub", no_such_repo, "vae", "base.base_model")


# --- fingerprint ------------------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights(tiny_sd_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_sd_dir))
    assert len(model_fingerprint(str(copy))) == 16

    (copy / ".cache").mkdir()
    (copy / ".cache" / "note.json").write_text("{}")  # hidden files are not part of the model
    assert model_fingerprint(str(copy)) == model_fingerprint(str(tiny_sd_dir))

    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 0.02}))
    assert model_fingerprint(str(copy)) != model_fingerprint(str(tiny_sd_dir))


def test_fingerprint_of_a_single_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"one")
    first = model_fingerprint(str(path))
    path.write_bytes(b"other")
    assert model_fingerprint(str(path)) != first
