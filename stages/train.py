"""DVC stage `train@<method>`: train one method (`python stages/train.py <method>`).

With `train.common.processes` above 1 (or an `accelerate_config`), the stage replaces itself by
`accelerate launch ... stages/train.py <method>`, whose processes train together (see `sdpipe.training.processes`).
"""

import sys
from pathlib import Path

from sdpipe.errors import SdpipeError
from sdpipe.methods.registry import METHODS
from sdpipe.stage import run_stage
from sdpipe.training.processes import die_with_launcher, launch, launch_command, needs_launch


def main(params) -> None:
    method = sys.argv[1] if len(sys.argv) > 1 else ""
    if method not in params.train.methods:
        raise SdpipeError(f"train method {method!r} is not listed in train.methods ({params.train.methods})")
    common = params.train.common
    if needs_launch(common):
        script = str(Path(__file__).resolve())
        launch(launch_command(script, [method], common.processes, common.accelerate_config, params.base.device))
    die_with_launcher()
    METHODS[method].train(params, out_dir=Path(params.paths.train) / method)


if __name__ == "__main__":
    run_stage("train", main)
