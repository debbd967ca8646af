"""What every `stages/*.py` script shares: load params, report user errors cleanly, exit non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.markup import escape

from sdpipe.config import Params, ParamsError, load_params
from sdpipe.errors import SdpipeError
from sdpipe.progress import log


def run_stage(name: str, body: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Validates the params file, then runs `body(params)`; a user error ends the stage with exit status 1."""
    try:
        params = load_params(params_path)
        body(params)
    except (ParamsError, SdpipeError) as error:
        log(f"[bold red]{name} failed:[/] {escape(str(error))}")  # the message may quote [brackets]
        sys.exit(1)
