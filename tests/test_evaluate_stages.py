"""dvc.yaml's evaluate stages: one per model, each depending on its own model and code only, so a one-method change
re-scores that method alone (and the scoreboard)."""

from __future__ import annotations

import pytest
from test_registry import (
    INFRASTRUCTURE,
    METHODS_DIR,
    ROOT,
    covered,
    load_yaml,
    sdpipe_files_imported,
)

from sdpipe.methods.registry import METHODS


def stages() -> dict:
    return load_yaml("dvc.yaml")["stages"]


def required_code(*starts) -> set[str]:
    """The sdpipe files the scripts import (the config package and the stage infrastructure aside)."""
    imported = set().union(*(sdpipe_files_imported(start) for start in starts))
    return {
        path
        for path in imported
        if path not in INFRASTRUCTURE
        and not (path.startswith("sdpipe/config/") and path not in ("sdpipe/config/evaluate.py", "sdpipe/config/merge.py"))
        and (ROOT / path).stat().st_size > 0
    }


def test_one_stage_per_model_and_a_scoreboard_over_their_rows():
    all_stages = stages()
    assert all_stages["evaluate"]["matrix"]["method"] == "${train.methods}"
    assert all_stages["evaluate_merge"]["foreach"] == "${merge.recipes}"
    assert "${paths.train}/${item.method}/model" in all_stages["evaluate"]["deps"]
    assert "${paths.train}" not in all_stages["evaluate"]["deps"]  # not every method's outputs
    assert "${paths.merge}/${key}" in all_stages["evaluate_merge"]["do"]["deps"]
    scoreboard = all_stages["scoreboard"]
    assert "${paths.eval}/models" in scoreboard["deps"]
    assert scoreboard["outs"] == ["${paths.eval}/summary.json", "${paths.eval}/summary.md"]
    assert load_yaml("dvc.yaml")["metrics"] == ["${paths.eval}/summary.json"]


@pytest.mark.parametrize("name", list(METHODS))
def test_evaluate_deps_are_the_method_and_the_code_it_imports(name):
    deps = [dep.replace("${item.method}", name) for dep in stages()["evaluate"]["deps"]]
    code = [dep for dep in deps if not dep.startswith("${")]
    for dep in code:
        assert (ROOT / dep).exists(), f"dvc.yaml evaluate deps: {dep} does not exist"
        for other in set(METHODS) - {name}:
            assert not covered(f"sdpipe/methods/{other}.py", [dep]), f"evaluate@{name} depends on {dep}"
    required = required_code(METHODS_DIR / f"{name}.py", ROOT / "sdpipe" / "evaluate.py", ROOT / "stages" / "evaluate.py")
    missing = sorted(path for path in required | {"stages/evaluate.py"} if not covered(path, code))
    assert not missing, f"evaluate@{name} imports {missing}, which dvc.yaml's evaluate deps do not list"


@pytest.mark.parametrize("stage", ["evaluate_base", "evaluate_merge"])
def test_base_and_merge_deps_cover_the_code_they_import(stage):
    definition = stages()[stage]
    code = [dep for dep in definition.get("do", definition)["deps"] if not dep.startswith("${")]
    assert not any(dep.startswith("sdpipe/methods/") and dep != "sdpipe/methods/registry.py" for dep in code)
    required = required_code(ROOT / "sdpipe" / "evaluate.py", ROOT / "stages" / "evaluate.py") | {"stages/evaluate.py"}
    missing = sorted(path for path in required if not covered(path, code))
    assert not missing, f"{stage} imports {missing}, which dvc.yaml does not list"
