"""The whole pipeline from a clean clone: `dvc repro` end to end, a no-op `dvc repro`, and one changed param.

In a temporary `git clone` of this repository's HEAD (the committed tree only: the frozen `pretrain` stage's output
is committed, so it is not rebuilt; nothing is shared with this checkout's DVC cache), this runs:

1. `dvc repro`: the time of each stage, read from DVC's `Running stage '<name>'` lines as they arrive (a stage's
   time includes DVC hashing and caching its outputs), the total, and the peak RSS;
2. `dvc repro` again: it must run nothing;
3. `dvc exp run -S train.lora.learning_rate=<other>`: it must run `train@lora` and only stages downstream of it in
   `dvc dag` (evaluate@lora, scoreboard, merge, export; evaluate_merge@<recipe> only if the merge changed), never
   another method's training or evaluation, or the data stages.

Peak RSS is that of the largest single process of the tree (`/usr/bin/time -v` when present, else
`getrusage(RUSAGE_CHILDREN)`): the stages run one after another, so it is the peak of the heaviest stage. The
stages import `sdpipe` from the clone (PYTHONPATH), not from this checkout's editable install.

    python benchmarks/repro.py [--keep]                       # full run, ~8 min on 2 idle cores
    python benchmarks/repro.py --skip-full --clone DIR        # only steps 2 and 3, on a clone made with --keep
    python benchmarks/repro.py --dry                          # clone + `dvc repro --dry --force` (the parsing)
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)";$')
CHANGED_STAGE = "train@lora"
CHANGED_PARAM = "train.lora.learning_rate"
GNU_TIME = Path("/usr/bin/time")
# Baselines to print beside the figures: what the lead measured on 2 idle cores (None: not yet measured).
BASELINE_FULL_S = None
BASELINE_NOOP_S = 10.0  # a no-op repro should only hash dependencies


@dataclass
class Run:
    """One DVC command: its wall time, the stages it ran with their seconds, its peak RSS, its output."""

    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float | None = None
    returncode: int = 0
    output: str = ""


def parse_stage_times(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Stage -> seconds from timestamped output lines: a stage that ran lasts from its `Running stage` line to the
    next stage's line (run or skipped), or `end`."""
    marks = []  # (time, stage name that ran, or None for a skipped one)
    for stamp, line in lines:
        if match := RUNNING.search(line):
            marks.append((stamp, match.group(1)))
        elif SKIPPED.search(line):
            marks.append((stamp, None))
    stops = [stamp for stamp, _ in marks[1:]] + [end]
    return {name: stop - start for (start, name), stop in zip(marks, stops) if name is not None}


def parse_dag_edges(dot: str) -> list[tuple[str, str]]:
    """The edges of `dvc dag --dot` output."""
    return [match.groups() for line in dot.splitlines() if (match := EDGE.match(line.strip()))]


def downstream(edges: list[tuple[str, str]], stage: str) -> set[str]:
    """Every stage that depends, directly or not, on `stage`."""
    found, todo = set(), [stage]
    while todo:
        current = todo.pop()
        for parent, child in edges:
            if parent == current and child not in found:
                found.add(child)
                todo.append(child)
    return found


def clone_env(clone: Path) -> dict[str, str]:
    """The environment of the DVC commands: this Python's bin first, the clone's `sdpipe` first, unbuffered."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(clone) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_dvc(args: list[str], clone: Path, echo: bool) -> Run:
    """Runs `dvc <args>` in `clone`, timestamping each output line as it arrives."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as time_file:
        command = ["dvc", *args]
        if GNU_TIME.exists():
            command = [str(GNU_TIME), "-v", "-o", time_file.name, *command]
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=clone, env=clone_env(clone), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines = []
        for line in process.stdout:
            lines.append((time.perf_counter(), line.rstrip("\n")))
            if echo:
                print(f"  | {line}", end="", flush=True)
        returncode = process.wait()
        end = time.perf_counter()
        if GNU_TIME.exists():
            match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(time_file.name).read_text())
            peak = int(match.group(1)) / 1024 if match else None
        else:  # the largest of all children so far (this script runs few, small ones besides)
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return Run(
        seconds=end - start,
        stages=parse_stage_times(lines, end),
        peak_rss_mib=peak,
        returncode=returncode,
        output="\n".join(line for _, line in lines),
    )


def check(run: Run, what: str) -> None:
    if run.returncode != 0:
        tail = "\n".join(run.output.splitlines()[-20:])
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{tail}")


def make_clone(source: Path, into: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(source), str(into)], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=into, capture_output=True, text=True, check=True).stdout
    print(f"clone of {source} at {head.strip()}: {into}")
    probe = "import sdpipe; print(sdpipe.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=into, env=clone_env(into), capture_output=True, text=True,
                           check=False)
    if not found.stdout.strip().startswith(str(into)):
        raise SystemExit(f"the stages would import sdpipe from {found.stdout.strip()!r}, not from the clone")
    return into


def other_learning_rate(clone: Path) -> float:
    params = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
    return float(params["train"]["lora"]["learning_rate"]) * 2


def fmt(seconds: float | None) -> str:
    return f"{seconds:.1f}" if seconds is not None else "-"


def print_stage_table(run: Run) -> None:
    print(f"{'stage':<28}{'seconds':>10}{'share':>8}")
    for name, seconds in run.stages.items():
        print(f"{name:<28}{seconds:>10.1f}{seconds / run.seconds:>8.0%}")
    print(f"{'total (dvc repro)':<28}{run.seconds:>10.1f}{'':>8}  baseline {fmt(BASELINE_FULL_S)}")
    print(f"peak RSS (largest process): {fmt(run.peak_rss_mib)} MiB")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    parser.add_argument("--skip-full", action="store_true", help="only the no-op and exp checks, on --clone")
    parser.add_argument("--clone", type=Path, default=None, help="an existing clone (made with --keep)")
    parser.add_argument("--dry", action="store_true", help="only clone and `dvc repro --dry --force` (checks the parsing)")
    parser.add_argument("--source", type=Path, default=REPO, help="the repository to clone (default: this one)")
    parser.add_argument("--echo", action="store_true", help="echo DVC's output")
    args = parser.parse_args()
    if args.skip_full and args.clone is None:
        parser.error("--skip-full needs --clone DIR (a clone made with --keep)")
    if shutil.which("dvc", path=clone_env(REPO)["PATH"]) is None:
        raise SystemExit("dvc is not installed in this environment")

    temp = None
    if args.clone is not None:
        clone = args.clone.resolve()
    else:
        temp = Path(tempfile.mkdtemp(prefix="sdpipe-repro-"))
        clone = make_clone(args.source.resolve(), temp / "repo")
    try:
        dag = subprocess.run(["dvc", "dag", "--dot"], cwd=clone, env=clone_env(clone), capture_output=True, text=True,
                         check=False)
        if dag.returncode != 0:
            raise SystemExit(f"dvc dag --dot failed in {clone}:\n{dag.stderr or dag.stdout}")
        edges = parse_dag_edges(dag.stdout)
        if args.dry:
            # --force: plain --dry fails on a clean clone (it reads the outputs of stages that have not run)
            run = run_dvc(["repro", "--dry", "--force"], clone, args.echo)
            check(run, "dvc repro --dry --force")
            print(f"dvc repro --dry: {run.seconds:.1f}s; would run {len(run.stages)} stages: {', '.join(run.stages)}")
            return
        if not args.skip_full:
            run = run_dvc(["repro"], clone, args.echo)
            check(run, "dvc repro")
            print_stage_table(run)

        noop = run_dvc(["repro"], clone, args.echo)
        check(noop, "no-op dvc repro")
        print(f"no-op dvc repro: {noop.seconds:.1f}s (baseline {fmt(BASELINE_NOOP_S)}), "
              f"stages run: {', '.join(noop.stages) or 'none'}  {verdict(not noop.stages)}")

        learning_rate = other_learning_rate(clone)
        exp = run_dvc(["exp", "run", "-S", f"{CHANGED_PARAM}={learning_rate:g}"], clone, args.echo)
        check(exp, "dvc exp run")
        allowed = {CHANGED_STAGE} | downstream(edges, CHANGED_STAGE)
        ran = list(exp.stages)
        unexpected = [name for name in ran if name not in allowed]
        ok = CHANGED_STAGE in ran and not unexpected
        print(f"dvc exp run -S {CHANGED_PARAM}={learning_rate:g}: {exp.seconds:.1f}s")
        print(f"  ran: {', '.join(f'{name} ({exp.stages[name]:.1f}s)' for name in ran) or 'nothing'}")
        print(f"  allowed: {CHANGED_STAGE} and its dependents ({', '.join(sorted(allowed - {CHANGED_STAGE}))})")
        if unexpected:
            print(f"  unexpected: {', '.join(unexpected)}")
        print(f"exp run re-runs only {CHANGED_STAGE} and its dependents: {verdict(ok)}")
    finally:
        if temp is not None:
            if args.keep:
                print(f"kept the clone: {clone}  (next: python benchmarks/repro.py --skip-full --clone {clone})")
            else:
                shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
