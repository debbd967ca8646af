"""Progress reporting: rich progress bars on a terminal, plain periodic log lines otherwise (CI, DVC)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)


def log(message: str) -> None:
    """One line of stage output, on stderr so that stdout stays clean for data."""
    console.print(message, highlight=False, soft_wrap=True)


def track(items: Iterable[T], description: str, total: int | None = None, every_s: float = 10.0) -> Iterator[T]:
    """Iterates `items` with a progress bar on a terminal, or a log line every `every_s` seconds otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            of_total = f"/{total}" if total else ""
            log(f"{description}: {done}{of_total} ({now - start:.0f}s)")
    log(f"{description}: {done} done in {time.monotonic() - start:.1f}s")
