"""Bad `params.yaml` files, one fault per case: each is refused before any work, by `load_params` and by
`sdpipe validate` alike, with the YAML path of the bad key and what was expected (see also test_config.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.config import Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]
# (id, params.yaml text, YAML path of the problem, a fragment of its message)
BAD_VALUES = [
    # wrong types
    ("str-for-int", "base: {resolution: 32px}", "base.resolution", "valid integer"),
    ("str-for-list", "base: {datasets: star}", "base.datasets", "valid list"),
    ("list-for-int", "train: {common: {batch_size: [8]}}", "train.common.batch_size", "valid integer"),
    ("int-for-str", "base: {base_model_config: 5}", "base.base_model_config", "valid string"),
    ("str-for-float", "train: {common: {max_grad_norm: abc}}", "train.common.max_grad_norm", "valid number"),
    ("str-for-prompts", "train: {common: {sample_prompts: a red shape}}", "train.common.sample_prompts", "valid list"),
    ("null-for-int", "base: {seed: null}", "base.seed", "valid integer"),
    ("bool-for-int", "base: {seed: true}", "base.seed", "expected a number, got a boolean"),
    ("yes-for-int", "train: {common: {batch_size: yes}}", "train.common.batch_size", "got a boolean"),
    ("bool-for-float", "train: {textual_inversion: {learning_rate: on}}", "train.textual_inversion.learning_rate",
     "got a boolean"),
    ("null-section", "base:\n", "base", "expected a mapping of keys (this is a section), got null"),
    ("list-section", "base: [seed, 1]", "base", "got a list"),
    ("int-subsection", "train: {common: 3}", "train.common", "got a number"),
    # numbers out of range
    ("resolution-too-big", "base: {resolution: 4104}", "base.resolution", "less than or equal to 4096"),
    ("resolution-zero", "base: {resolution: 0}", "base.resolution", "greater than or equal to 8"),
    ("beta-one", "train: {common: {adam_beta1: 1.0}}", "train.common.adam_beta1", "less than 1"),
    ("batch-zero", "train: {common: {batch_size: 0}}", "train.common.batch_size", "greater than or equal to 1"),
    ("dropout-one", "train: {common: {caption_ops: {tag_dropout: 1.0}}}", "train.common.caption_ops.tag_dropout",
     "less than 1"),
    ("vectors", "train: {textual_inversion: {num_vectors: 76}}", "train.textual_inversion.num_vectors",
     "less than or equal to 75"),
    ("seeds-per-prompt", "evaluate: {seeds_per_prompt: 1}", "evaluate.seeds_per_prompt", "greater than or equal to 2"),
    ("lr-negative", "train: {textual_inversion: {learning_rate: -1.0e-3}}", "train.textual_inversion.learning_rate",
     "greater than 0"),
    ("lr-inf", "train: {textual_inversion: {learning_rate: .inf}}", "train.textual_inversion.learning_rate",
     "finite number"),
    ("lr-nan", "train: {textual_inversion: {learning_rate: .nan}}", "train.textual_inversion.learning_rate",
     "finite number"),
    ("snr-inf", "train: {common: {snr_gamma: .inf}}", "train.common.snr_gamma", "finite number"),
    ("fraction-for-int", "base: {seed: 1.5}", "base.seed", "fractional part"),
    # unknown keys and sections
    ("typo-section", "trian: {}", "trian", "unknown key"),
    ("capitalized-section", "Base: {seed: 1}", "Base", "unknown key"),
    ("typo-subsection", "train: {commn: {batch_size: 2}}", "train.commn", "unknown key"),
    ("typo-nested-key", "prepare: {buckets: {enable: true}}", "prepare.buckets.enable", "unknown key"),
    ("typo-method-section", "train: {textual_inversoin: {max_steps: 4}}", "train.textual_inversoin", "unknown key"),
    ("key-of-another-section", "base: {batch_size: 8}", "base.batch_size", "unknown key"),
    # bad enum values
    ("scheduler", "train: {common: {lr_scheduler: cosine_annealing}}", "train.common.lr_scheduler", "Input should be"),
    ("encode-mode", "encode: {mode: random}", "encode.mode", "'mean' or 'sample'"),
    ("caption-backend", "caption: {backend: gpt}", "caption.backend", "'template', 'filename' or 'blip'"),
    ("precision-case", "base: {precision: FP16}", "base.precision", "'fp32', 'fp16' or 'bf16'"),
    ("device-index", "base: {device: 'cuda:x'}", "base.device", "should match pattern"),
    ("unknown-method", "train: {methods: [dreamfusion]}", "train.methods.0", "Input should be"),
    ("method-twice", "train: {methods: [textual_inversion, textual_inversion]}", "train.methods", "listed twice"),
    ("extension-without-dot", "prepare: {extensions: [png]}", "prepare.extensions", "with its dot"),
    ("extension-not-image", "prepare: {extensions: [.pdf2]}", "prepare.extensions", "Pillow"),
    # bad dataset names (they become folder names under datasets/ and artifacts/)
    ("dataset-slash", "base: {datasets: [a/b]}", "base.datasets.0", "should match pattern"),
    ("dataset-dotdot", "base: {datasets: ['..']}", "base.datasets.0", "should match pattern"),
    ("dataset-absolute", "base: {datasets: [/etc]}", "base.datasets.0", "should match pattern"),
    ("dataset-dash", "base: {datasets: [-rf]}", "base.datasets.0", "should match pattern"),
    ("dataset-space", "base: {datasets: [' star']}", "base.datasets.0", "should match pattern"),
    ("dataset-empty-name", "base: {datasets: ['']}", "base.datasets.0", "should match pattern"),
    ("dataset-null", "base: {datasets: [null]}", "base.datasets.0", "valid string"),
    ("datasets-empty", "base: {datasets: []}", "base.datasets", "at least 1 item"),
    ("dataset-twice", "base: {datasets: [star, star]}", "base.datasets", "star is listed twice"),
    ("method-dataset-escapes", "train: {textual_inversion: {datasets: ['../x']}}", "train.textual_inversion.datasets.0",
     "should match pattern"),
    # cross-field errors
    ("timesteps", "train: {common: {min_timestep: 500, max_timestep: 100}}", "train.common",
     "min_timestep (500) must be smaller than train.common.max_timestep (100)"),
    ("buckets", "prepare: {buckets: {step: 16, min_side: 24}}", "prepare.buckets", "multiple of prepare.buckets.step"),
    ("no-sample-prompts", "train: {common: {sample_every: 10, sample_prompts: []}}", "train.common",
     "sample_prompts is empty"),
    ("method-dataset-not-prepared", "base: {datasets: [star]}\ntrain: {methods: [textual_inversion], "
     "textual_inversion: {datasets: [outlined]}}", "train.textual_inversion.datasets",
     "outlined not in base.datasets (star)"),
    ("method-datasets-empty", "train: {methods: [textual_inversion], textual_inversion: {datasets: []}}",
     "train.textual_inversion.datasets", "empty"),
    ("blip-without-model", "caption: {backend: blip}", "caption", "caption.blip_model is required"),
    ("template-field", "caption: {template: 'a {tokn}'}", "caption.template", "unknown field {tokn}"),
    # the whole file
    ("scalar-file", "42", "<root>", "expected a mapping of sections, got int"),
    ("text-file", "just some words", "<root>", "expected a mapping of sections, got str"),
    ("duplicate-key", "base:\n  seed: 1\n  seed: 2\n", "<file>", "found duplicate key 'seed'"),
    ("duplicate-section", "base: {seed: 1}\nbase: {seed: 2}\n", "<file>", "found duplicate key 'base'"),
    ("tab-indent", "base:\n\tseed: 1\n", "<file>", "not valid YAML"),
    ("two-documents", "base: {seed: 1}\n---\nbase: {seed: 2}\n", "<file>", "expected a single document"),
    ("unclosed-quote", "base: {base_model: 'artifacts}\n", "<file>", "not valid YAML"),
    ("unhashable-key", "? [a, b]\n: 1\n", "<file>", "unhashable key"),
]


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(path) in str(caught.value)  # the message names the file
    return caught.value.problems


def validate(path: Path):
    # a wide console: rich wraps long lines at the terminal width (80 columns under the test runner)
    return CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "1000"})


@pytest.mark.parametrize("text, key, fragment", [case[1:] for case in BAD_VALUES], ids=[case[0] for case in BAD_VALUES])
def test_bad_value_is_refused_with_its_yaml_path(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert any(problem.startswith(f"{key}: ") and fragment in problem for problem in problems), problems

    result = validate(path)
    assert result.exit_code == 1, result.output
    assert f"{path}: {len(problems)} problem(s)" in result.output
    assert f"\n  {key}: " in result.output and fragment in result.output


def test_missing_file_and_a_folder_instead_of_a_file(tmp_path):
    for path, message in ((tmp_path / "missing.yaml", "<file>: no such file"), (tmp_path, "<file>: cannot be read")):
        assert any(problem.startswith(message) for problem in problems_of(path))
        result = validate(path)
        assert result.exit_code == 1 and message in result.output, result.output


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "---\n", "\ufeff\n"], ids=["empty", "comment", "marker", "bom"])
def test_empty_files_mean_all_defaults(tmp_path, text):
    path = write(tmp_path, text)
    assert load_params(path) == Params()
    result = validate(path)
    assert result.exit_code == 0 and "ok" in result.output


def test_python_tags_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"base: !!python/object/apply:os.system ['touch {marker}']\n")
    assert any("could not determine a constructor" in problem for problem in problems_of(path))
    assert validate(path).exit_code == 1
    assert not marker.exists()


def test_user_text_in_messages_is_printed_verbatim(tmp_path):
    # rich would read `[/]` and `[bold]` in a message as markup (and crash on the first one)
    path = write(tmp_path, "base: {'[/]x[bold]': 1}\n")
    result = validate(path)
    assert result.exit_code == 1
    assert "base.[/]x[bold]: unknown key" in result.output


def test_all_problems_of_a_file_are_listed_together(tmp_path):
    path = write(tmp_path, "base: {seed: -1, resolution: 33, precision: fp8}\ntrain: {commn: 1}\nbogus: 2\n")
    problems = problems_of(path)
    paths = sorted(problem.split(":")[0] for problem in problems)
    assert paths == ["base.precision", "base.resolution", "base.seed", "bogus", "train.commn"]
    assert validate(path).output.count("\n  ") == 5


def test_lenient_yaml_spellings_that_are_fine(tmp_path):
    # PyYAML reads `1e-4` (no dot) as text; it is a number all the same. `yes` is a boolean where one belongs.
    text = "train:\n  common: {batch_size: 4}\n  textual_inversion: {learning_rate: 1e-4}\nprepare: {strict: yes}\n"
    params = load_params(write(tmp_path, text))
    assert params.train.textual_inversion.learning_rate == pytest.approx(1e-4)
    assert params.prepare.strict is True and params.train.common.batch_size == 4


def test_yaml_merge_keys_may_override(tmp_path):
    text = "train:\n  common:\n    <<: {batch_size: 4, flip: false}\n    batch_size: 2\n"
    params = load_params(write(tmp_path, text))
    assert (params.train.common.batch_size, params.train.common.flip) == (2, False)


def test_stage_refuses_bad_params_before_any_work(tmp_path):
    (tmp_path / "datasets" / "star").mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(json.dumps({"base": {"datasets": ["star"], "resolution": 30}}))
    result = subprocess.run(
        [sys.executable, str(REPO / "stages" / "prepare.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "base.resolution: Input should be a multiple of 8" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["datasets", "params.yaml"]  # no artifacts/
