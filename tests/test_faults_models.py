"""Bad model files, one fault per case: truncated or malformed safetensors, the wrong architecture or SD version,
missing components, and pickles that would run code. Each is refused with an `SdpipeError` naming the file or
the params key; nothing is loaded half-initialized and nothing is unpickled (see also test_loading.py and
test_single_file.py)."""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdpipe.errors import SdpipeError
from sdpipe.models.loading import load_pipeline, load_text_encoder, load_tokenizer, load_unet, load_vae
from sdpipe.models.single_file import load_single_file_pipeline, load_single_file_state_dict, save_single_file
from test_caption import tiny_blip  # noqa: F401  (a fixture: a tiny random BLIP captioner folder)

PACKAGE = Path(__file__).resolve().parents[1] / "sdpipe"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def single_file(tiny_sd_dir, tmp_path_factory) -> Path:
    return save_single_file(tiny_sd_dir, tmp_path_factory.mktemp("single") / "tiny.safetensors")


@pytest.fixture(scope="module")
def single_file_tensors(single_file) -> dict[str, torch.Tensor]:
    return load_file(single_file)


def variant(base: Path, folder: Path, replace: str | None = None) -> Path:
    """A diffusers folder made of links to `base`'s files, except the `replace` folder, which is copied."""
    folder.mkdir(parents=True)
    for entry in base.iterdir():
        if entry.name == replace:
            (folder / entry.name).mkdir()
            for file in entry.iterdir():
                (folder / entry.name / file.name).write_bytes(file.read_bytes())
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- safetensors files with a bad header or body --------------------------------------------------------------


def with_header(data: bytes, header: bytes | dict, length: int | None = None) -> bytes:
    """`data` (a safetensors file) with its JSON header replaced; `length` overrides the header's length field."""
    old_length = int.from_bytes(data[:8], "little")
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    return (length if length is not None else len(header)).to_bytes(8, "little") + header + data[8 + old_length :]


def header_of(data: bytes) -> dict:
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def first_entry(data: bytes) -> dict:
    """The header entry (dtype, shape, data_offsets) of the first tensor of a safetensors file."""
    return next(entry for key, entry in header_of(data).items() if key != "__metadata__")


def change_tensor(data: bytes, **entry) -> bytes:
    header = header_of(data)
    next(value for key, value in header.items() if key != "__metadata__").update(entry)
    return with_header(data, header)


CORRUPT_FILES = {
    "empty": lambda data: b"",
    "shorter-than-length-field": lambda data: data[:3],
    "truncated-body": lambda data: data[: len(data) - 1000],
    "truncated-header": lambda data: data[: 8 + int.from_bytes(data[:8], "little") // 2],
    "header-bad-json": lambda data: with_header(data, b'{"a": [' + b" " * 64),
    "header-not-utf8": lambda data: with_header(data, b'{"\xff": 1}'),
    "header-not-an-object": lambda data: with_header(data, b"[1, 2, 3]"),
    "header-length-past-eof": lambda data: with_header(data, header_of(data), length=len(data) * 2),
    "header-length-huge": lambda data: with_header(data, header_of(data), length=2**63),
    "offsets-past-eof": lambda data: change_tensor(data, data_offsets=[0, 10**12]),
    "offsets-reversed": lambda data: change_tensor(data, data_offsets=first_entry(data)["data_offsets"][::-1]),
    "shape-not-offsets": lambda data: change_tensor(data, shape=[99999]),
    "unknown-dtype": lambda data: change_tensor(data, dtype="Q99"),
    "zip-pickle-renamed": lambda data: torch_saved({"weight": torch.zeros(2)}),
}


def torch_saved(obj) -> bytes:
    """What `torch.save` writes: a zip holding a pickle."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("corrupt", list(CORRUPT_FILES.values()), ids=list(CORRUPT_FILES))
def test_corrupt_single_file_is_refused(single_file, tiny_sd_dir, tmp_path, corrupt):
    path = tmp_path / "model.safetensors"
    path.write_bytes(corrupt(single_file.read_bytes()))
    expected = rf"single-file checkpoint {path}: not a valid \.safetensors file \(.+\); it may be truncated or corrupt"
    with pytest.raises(SdpipeError, match=expected):
        load_single_file_state_dict(path)
    with pytest.raises(SdpipeError, match=expected):
        load_pipeline(str(path), str(tiny_sd_dir))


@pytest.mark.parametrize(
    "component, weights", [("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]
)
@pytest.mark.parametrize("corrupt", ["truncated-body", "header-bad-json", "offsets-past-eof"])
def test_corrupt_weights_in_a_folder_are_refused(tiny_sd_dir, tmp_path, component, weights, corrupt):
    folder = variant(tiny_sd_dir, tmp_path / "model", replace=component)
    path = folder / component / weights
    path.write_bytes(CORRUPT_FILES[corrupt](path.read_bytes()))
    loader = {"unet": load_unet, "text_encoder": load_text_encoder}[component]
    with pytest.raises(SdpipeError, match=rf"base\.base_model '{folder}': cannot load its {component}: .*(corrupt|trunc)"):
        loader(str(folder))


# --- the wrong architecture, or another SD version than the config ------------------------------------------


def test_random_state_dict_is_not_a_checkpoint(tiny_sd_dir, tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(8, 8), "head.bias": torch.randn(8)}, path)
    with pytest.raises(SdpipeError, match=rf"{path}: no UNet weights"):
        load_pipeline(str(path), str(tiny_sd_dir))


def test_sd2_shaped_file_with_an_sd1_config(single_file_tensors, tiny_sd_dir, tmp_path):
    # SD 2.x: an OpenCLIP text encoder (`cond_stage_model.model.`) and 1024-wide cross-attention
    tensors = {key: value for key, value in single_file_tensors.items() if not key.startswith("cond_stage_model.")}
    for key in [key for key in tensors if ".attn2.to_k." in key or ".attn2.to_v." in key]:
        tensors[key] = torch.zeros(tensors[key].shape[0], 1024)
    tensors["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 64)
    tensors["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 64)
    path = tmp_path / "sd2.safetensors"
    save_file(tensors, path)
    expected = rf"single-file checkpoint {path} does not fit the architecture of base\.base_model_config {tiny_sd_dir}"
    with pytest.raises(SdpipeError, match=expected) as caught:
        load_pipeline(str(path), str(tiny_sd_dir))
    assert "another architecture or Stable Diffusion version" in str(caught.value)


def test_sdxl_file_with_an_sd_config_folder_names_both(single_file_tensors, tiny_sd_dir, tmp_path):
    tensors = {key: value for key, value in single_file_tensors.items() if not key.startswith("cond_stage_model.")}
    tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(64)
    tensors["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 64)
    path = tmp_path / "sdxl.safetensors"
    save_file(tensors, path)
    with pytest.raises(SdpipeError, match=rf"{path}' is a Stable Diffusion XL checkpoint but base.base_model_config .* is a Stable Diffusion 1.x/2.x folder"):
        load_pipeline(str(path), str(tiny_sd_dir))


def test_config_of_another_version_than_the_file(single_file, tiny_sd_dir, tmp_path):
    # the config folder says SD 2.x-like (cross-attention 1024 wide, another text encoder); the file is SD 1.x-like
    config = variant(tiny_sd_dir, tmp_path / "config", replace="unet")
    edit_json(config / "unet" / "config.json", cross_attention_dim=1024)
    with pytest.raises(SdpipeError, match=r"has shape \[\d+, 64\] in the file but \[\d+, 1024\] in the config") as caught:
        load_pipeline(str(single_file), str(config))
    assert str(single_file) in str(caught.value) and str(config) in str(caught.value)


def test_single_file_missing_a_weight(single_file_tensors, tiny_sd_dir, tmp_path):
    for prefix in ("model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm"):
        path = tmp_path / "incomplete.safetensors"
        save_file({k: v for k, v in single_file_tensors.items() if not k.startswith(prefix)}, path)
        with pytest.raises(SdpipeError, match=rf"{path} does not fit .*missing"):
            load_pipeline(str(path), str(tiny_sd_dir))


@pytest.mark.parametrize("component, change", [
    ("unet", {"block_out_channels": [32, 64]}),
    ("vae", {"latent_channels": 8}),
    ("text_encoder", {"hidden_size": 128}),
])
def test_folder_config_that_does_not_fit_its_weights(tiny_sd_dir, tmp_path, component, change):
    folder = variant(tiny_sd_dir, tmp_path / "model", replace=component)
    edit_json(folder / component / "config.json", **change)
    expected = rf"base\.base_model '{folder}': cannot load its {component}: its weights do not fit its config"
    with pytest.raises(SdpipeError, match=expected):
        load_pipeline(str(folder))


@pytest.mark.parametrize(
    "component, weights, key",
    [("unet", "diffusion_pytorch_model.safetensors", "conv_out.weight"),
     ("text_encoder", "model.safetensors", "final_layer_norm.weight")],
)
def test_folder_weights_missing_a_tensor(tiny_sd_dir, tmp_path, component, weights, key):
    # transformers would quietly initialize the missing text encoder weight at random
    folder = variant(tiny_sd_dir, tmp_path / "model", replace=component)
    tensors = load_file(folder / component / weights)
    del tensors[next(name for name in tensors if name.endswith(key))]
    save_file(tensors, folder / component / weights)
    expected = rf"its {component} weights do not fit its config \(1 weight\(s\) missing: .*{key}"
    with pytest.raises(SdpipeError, match=expected):
        load_pipeline(str(folder))


# --- missing components of a diffusers folder -------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_folder_without_a_component(tiny_sd_dir, tmp_path, component):
    folder = variant(tiny_sd_dir, tmp_path / "model")
    (folder / component).unlink()
    expected = rf"base\.base_model '{folder}': cannot load its {component}: the folder has no {component}/"
    with pytest.raises(SdpipeError, match=expected):
        load_pipeline(str(folder))


def test_missing_tokenizer_is_not_replaced_by_an_empty_one(tiny_sd_dir, tmp_path):
    folder = variant(tiny_sd_dir, tmp_path / "model", replace="tokenizer")
    for file in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / "tokenizer" / file).unlink()
    with pytest.raises(SdpipeError, match=r"cannot load its tokenizer: the folder has no tokenizer/vocab\.json"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("component, weights", [("vae", "diffusion_pytorch_model.safetensors"),
                                                ("text_encoder", "model.safetensors")])
def test_component_without_its_weights(tiny_sd_dir, tmp_path, component, weights):
    folder = variant(tiny_sd_dir, tmp_path / "model", replace=component)
    (folder / component / weights).unlink()
    with pytest.raises(SdpipeError, match=rf"cannot load its {component}: .*no file named {weights}"):
        load_pipeline(str(folder))


# --- pickles whose unpickling would run code ---------------------------------------------------------------------


class WritesMarker:
    """Unpickling this creates `marker`: the stand-in for a payload that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def payload(tmp_path):
    """`(pickled bytes, torch.save zip bytes, marker path)` of a payload that works when unpickled."""
    marker = tmp_path / "code-ran.marker"
    control = tmp_path / "control.marker"
    pickle.loads(pickle.dumps(WritesMarker(control)))
    assert control.exists()  # the payload does run code when unpickled
    state_dict = {"state_dict": {"weight": torch.zeros(2)}, "payload": WritesMarker(marker)}
    return pickle.dumps(state_dict), torch_saved(state_dict), marker


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "model.bin", "model.safetensors"])
def test_pickled_single_file_is_refused_without_unpickling(tiny_sd_dir, tmp_path, payload, name):
    plain, zipped, marker = payload
    for data in (plain, zipped):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SdpipeError, match=r"legacy pickled checkpoint|not a valid \.safetensors file"):
            load_pipeline(str(path), str(tiny_sd_dir))
        with pytest.raises(SdpipeError, match=r"not a valid \.safetensors file"):
            load_single_file_state_dict(path)
        with pytest.raises(SdpipeError, match=r"not a valid \.safetensors file"):
            load_single_file_pipeline(path, tiny_sd_dir)
    assert not marker.exists()


@pytest.mark.parametrize("component, weights", [
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
    ("text_encoder", "pytorch_model"),
])
def test_pickled_weights_in_a_folder_are_never_read(tiny_sd_dir, tmp_path, payload, component, weights):
    _, zipped, marker = payload
    folder = variant(tiny_sd_dir, tmp_path / "model", replace=component)
    for file in (folder / component).glob("*.safetensors"):
        file.unlink()
    (folder / component / f"{weights}.bin").write_bytes(zipped)
    expected = rf"cannot load its {component}: .*no file named .*\.safetensors.*sdpipe reads only \.safetensors"
    loader = {"unet": load_pipeline, "vae": load_vae, "text_encoder": load_text_encoder}[component]
    with pytest.raises(SdpipeError, match=expected):
        loader(str(folder))
    assert not marker.exists()


def test_no_code_in_sdpipe_unpickles():
    """Every `torch.load` in the package passes `weights_only=True`; nothing calls pickle, dill or joblib loads."""
    unsafe = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                weights_only = [kw.value for kw in node.keywords if kw.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                    unsafe.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
                unsafe.append(f"{where}: {owner}.{node.func.attr}")
            if any(kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                   for kw in node.keywords):
                unsafe.append(f"{where}: weights_only=False")
    assert not unsafe, unsafe


def test_blip_captioner_is_read_from_safetensors_only(tiny_blip, tmp_path, payload):
    from sdpipe.data.captions import load_blip

    _, zipped, marker = payload
    folder = tmp_path / "blip"
    folder.mkdir()
    for file in tiny_blip.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    weights = folder / "model.safetensors"
    weights.write_bytes(CORRUPT_FILES["truncated-body"](weights.read_bytes()))
    with pytest.raises(SdpipeError, match=rf"caption\.blip_model: {folder} is not a BLIP captioning model folder"):
        load_blip(str(folder), "cpu")
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(zipped)
    with pytest.raises(SdpipeError, match=r"is not a BLIP captioning model folder .*model\.safetensors"):
        load_blip(str(folder), "cpu")
    assert not marker.exists()
