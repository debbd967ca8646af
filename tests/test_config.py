"""params.yaml validation: the shipped file, every kind of bad file, and the `sdpipe validate` command."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdpipe.config import Params, ParamsError, load_params, parse_params
from sdpipe.config.section import Section

ROOT = Path(__file__).resolve().parents[1]


def problems_of(data) -> list[str]:
    with pytest.raises(ParamsError) as caught:
        parse_params(data)
    return caught.value.problems


def test_shipped_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every section of the model is written out in the shipped file, so users see every knob
    assert set(data) == set(Params.model_fields)
    assert params.base.base_model == params.paths.pretrain


def test_every_field_of_every_section_is_documented():
    def walk(model: type[Section], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                walk(annotation, f"{prefix}{name}.")

    walk(Params, "")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"base": {"sede": 1}}, "base.sede: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"base": {"seed": "zero"}}, "base.seed: Input should be a valid integer"),
        ({"base": {"seed": -1}}, "base.seed: Input should be greater than or equal to 0"),
        ({"base": {"resolution": 30}}, "base.resolution: Input should be a multiple of 8"),
        ({"base": {"precision": "fp8"}}, "base.precision: Input should be 'auto', 'fp32', 'fp16' or 'bf16'"),
        ({"base": {"device": "gpu"}}, "base.device: String should match pattern"),
        ({"base": {"datasets": ["../etc"]}}, "base.datasets.0: String should match pattern"),
        ({"pretrain": {"vae_lr": 0}}, "pretrain.vae_lr: Input should be greater than 0"),
        ({"prepare": {"strict": "maybe"}}, "prepare.strict: Input should be a valid boolean"),
        ({"caption": {"backend": "blip"}}, "caption: Value error, caption.blip_model is required"),
        ({"train": {"methods": ["dreamfusion"]}}, "train.methods.0: Input should be"),
    ],
)
def test_bad_values_name_their_yaml_path(data, expected):
    assert any(problem.startswith(expected) for problem in problems_of(data)), problems_of(data)


def test_all_problems_are_reported_at_once():
    problems = problems_of({"base": {"seed": "x", "foo": 1}, "bogus": 1})
    assert len(problems) == 3


def test_non_mapping_and_broken_yaml_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping of sections"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("base: {seed: [1,\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")
    (tmp_path / "latin1.yaml").write_bytes("base: {base_model: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(tmp_path / "latin1.yaml")
    with pytest.raises(ParamsError, match="no such file"):
        load_params(tmp_path / "missing.yaml")


def test_empty_file_means_all_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_params(tmp_path / "empty.yaml") == Params()


def run_validate(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdpipe.cli", "validate", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_validate_command_accepts_the_shipped_file():
    result = run_validate("params.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_validate_command_lists_each_problem_and_exits_nonzero(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("base:\n  seed: x\n  sede: 1\npretrain:\n  unet_steps: 0\n")
    result = run_validate(str(bad))
    assert result.returncode == 1
    assert "base.seed: Input should be a valid integer" in result.stdout
    assert "base.sede: unknown key" in result.stdout
    assert "pretrain.unet_steps: Input should be greater than or equal to 1" in result.stdout
