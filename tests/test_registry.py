"""The method registry: every method declared once and complete, no method importing another, and dvc.yaml's
`train@<method>` deps covering exactly one method module and the core it imports."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from sdpipe.config import parse_params
from sdpipe.config import train as train_config
from sdpipe.config.merge import LORA_METHODS
from sdpipe.config.section import Section
from sdpipe.methods.registry import METHODS, OUTPUTS, methods_writing

ROOT = Path(__file__).resolve().parents[1]
METHODS_DIR = ROOT / "sdpipe" / "methods"
NOT_METHODS = {"__init__", "registry"}  # the modules of sdpipe/methods that are not a method


def load_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def train_stage() -> dict:
    return load_yaml("dvc.yaml")["stages"]["train"]


def test_every_module_of_sdpipe_methods_is_registered():
    modules = {path.stem for path in METHODS_DIR.glob("*.py")} - NOT_METHODS
    assert modules == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_is_complete(name):
    method = METHODS[name]
    assert method.name == name
    assert method.output in OUTPUTS
    assert method.summary.strip()

    # its module, with its entry points
    assert (METHODS_DIR / f"{name}.py").is_file()
    module = method.module()
    assert module.__name__ == f"sdpipe.methods.{name}"
    for entry in ("train", "sampling_pipeline"):
        assert callable(getattr(module, entry, None)), f"sdpipe.methods.{name} has no {entry}"
    assert callable(getattr(module, "evaluation_metrics", None)) == method.own_metrics
    assert list(inspect.signature(module.train).parameters) == ["params", "out_dir"]
    assert list(inspect.signature(module.sampling_pipeline).parameters) == ["params", "model_dir", "device"]

    # a TrainingMethod it defines carries its name (its params key `train.<name>` and its output folder come from it)
    from sdpipe.training import TrainingMethod

    for value in vars(module).values():
        if inspect.isclass(value) and value.__module__ == module.__name__ and issubclass(value, TrainingMethod):
            assert value.name == name, f"{value.__name__}.name is {value.name!r}"

    # its params class is the one TrainParams validates train.<name> with, and params.yaml writes it out
    params_class = getattr(train_config, method.params)
    assert issubclass(params_class, Section)
    field = train_config.TrainParams.model_fields[name]
    assert field.annotation is params_class
    assert field.description == method.summary
    assert name in load_yaml("params.yaml")["train"]
    assert isinstance(getattr(parse_params({"train": {"methods": [name]}}).train, name), params_class)


def test_train_methods_and_lora_methods_derive_from_the_registry():
    methods_field = train_config.TrainParams.model_fields["methods"]
    (literal,) = get_args(methods_field.annotation)
    assert get_args(literal) == tuple(METHODS)
    assert set(train_config.TrainParams.model_fields) == {"methods", "common", *METHODS}
    assert LORA_METHODS == methods_writing("lora") == ("lora",)
    with pytest.raises(ValueError, match="unknown method output"):
        methods_writing("loras")


def test_the_shipped_pipeline_trains_every_method():
    stage = train_stage()
    assert stage["matrix"]["method"] == "${train.methods}"
    assert set(load_yaml("params.yaml")["train"]["methods"]) == set(METHODS)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (at the top or inside a function), as dotted names; `from a import b` gives both
    `a` and `a.b` (b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("name", list(METHODS))
def test_no_method_imports_another(name):
    other_methods = {f"sdpipe.methods.{other}" for other in METHODS if other != name}
    imported = imported_modules(METHODS_DIR / f"{name}.py")
    assert not imported & other_methods, f"sdpipe.methods.{name} imports {sorted(imported & other_methods)}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sdpipe.methods import lora\n    import sdpipe.methods.finetune\n")
    assert {"sdpipe.methods.lora", "sdpipe.methods.finetune"} <= imported_modules(module)


# What every stage uses without listing it in dvc.yaml (the conventions of the other stages): the package marker,
# the error type, logging, the stage runner, and the config package (a stage lists its own section's module).
INFRASTRUCTURE = {"sdpipe/__init__.py", "sdpipe/errors.py", "sdpipe/progress.py", "sdpipe/stage.py"}


def module_path(name: str) -> Path | None:
    """The file of module `name` under the repository, or None (a class or function of `from a import b`, or not
    sdpipe's)."""
    for path in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def sdpipe_files_imported(start: Path) -> set[str]:
    """The repository paths of the sdpipe modules `start` imports, directly or through others (not descending into
    the config package, whose modules validate other stages' sections)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        for name in imported_modules(path):
            found = module_path(name) if name.startswith("sdpipe") else None
            if found is None:
                continue
            relative = found.relative_to(ROOT).as_posix()
            if relative not in seen:
                seen.add(relative)
                if not relative.startswith("sdpipe/config/"):
                    todo.append(found)
    return seen


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("name", list(METHODS))
def test_train_deps_are_the_method_and_the_core_it_imports(name):
    """`train@<name>` lists its own module and every sdpipe module it imports (so no change is missed), but no
    other method (so editing one method re-runs only its stage)."""
    deps = [dep.replace("${item.method}", name) for dep in train_stage()["deps"]]
    code = [dep for dep in deps if not dep.startswith("${")]
    assert f"sdpipe/methods/{name}.py" in code
    for dep in code:
        assert (ROOT / dep).exists(), f"dvc.yaml train deps: {dep} does not exist"
        for other in set(METHODS) - {name}:
            assert not covered(f"sdpipe/methods/{other}.py", [dep]), f"train@{name} depends on {dep}"

    imported = sdpipe_files_imported(METHODS_DIR / f"{name}.py") | sdpipe_files_imported(ROOT / "stages" / "train.py")
    required = {
        path
        for path in imported
        if path not in INFRASTRUCTURE
        and not (path.startswith("sdpipe/config/") and path != "sdpipe/config/train.py")
        and (ROOT / path).stat().st_size > 0  # an empty package __init__
        and path != f"sdpipe/methods/{name}.py"
    }
    missing = sorted(path for path in required if not covered(path, code))
    assert not missing, f"train@{name} imports {missing}, which dvc.yaml's train deps do not list"


def test_nothing_looks_a_method_up_but_the_registry():
    """Lookups by name go through `METHODS` (no `import_module("sdpipe.methods." ...)` of their own)."""
    offenders = []
    for folder in ("sdpipe", "stages", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == METHODS_DIR / "registry.py":
                continue
            text = path.read_text(encoding="utf-8")
            if "import_module(" in text and "sdpipe.methods" in text:
                offenders.append(path.relative_to(ROOT).as_posix())
    assert not offenders


def test_validating_params_imports_no_torch():
    code = (
        "import sys\n"
        "from sdpipe.config import load_params\n"
        "import sdpipe.methods.registry\n"
        f"load_params({str(ROOT / 'params.yaml')!r})\n"
        "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
