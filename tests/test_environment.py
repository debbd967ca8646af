"""The locked environment: `constraints.txt` pins every package that pyproject.toml asks for, exactly."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            found[normalized(name)] = version
    return found


def test_every_dependency_and_extra_but_gpu_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [req for name, reqs in extras.items() if name != "gpu" for req in reqs]
    names = {normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group()) for requirement in requirements}
    missing = sorted(names - set(pins()))
    assert missing == [], f"constraints.txt does not pin {missing}; run bash .ci/lock"


def test_torch_pin_has_no_local_label():
    assert "+" not in pins()["torch"]  # 2.13.0 matches both the CPU and the CUDA build
