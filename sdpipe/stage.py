"""What every `stages/*.py` script shares: load params, report user errors cleanly, exit non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.markup import escape

from sdpipe.config import Params, ParamsError, load_params
from sdpipe.config.sdxl import family_view
from sdpipe.errors import SdpipeError
from sdpipe.progress import log


def run_stage(name: str, body: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Validates the params file, then runs `body(params)`; a user error ends the stage with exit status 1.

    `--family <name>` on the command line (the stages of `base.extra_families`) runs the body on that family's view of
    the params (`sdpipe.config.sdxl.family_view`); the flag is taken out of `sys.argv` first."""
    try:
        params = load_params(params_path)
        if "--family" in sys.argv:
            at = sys.argv.index("--family")
            family = sys.argv[at + 1] if at + 1 < len(sys.argv) else ""
            del sys.argv[at : at + 2]
            if family not in params.base.extra_families:
                raise SdpipeError(f"--family {family!r}: not in base.extra_families ({params.base.extra_families})")
            params = family_view(params, family)
        body(params)
    except (ParamsError, SdpipeError) as error:
        log(f"[bold red]{name} failed:[/] {escape(str(error))}")  # the message may quote [brackets]
        sys.exit(1)
