"""DVC stage `train@<method>`: train one method (`python stages/train.py <method>`)."""

import importlib
import sys
from pathlib import Path

from sdpipe.errors import SdpipeError
from sdpipe.stage import run_stage


def main(params) -> None:
    method = sys.argv[1] if len(sys.argv) > 1 else ""
    if method not in params.train.methods:
        raise SdpipeError(f"train method {method!r} is not listed in train.methods ({params.train.methods})")
    module = importlib.import_module(f"sdpipe.methods.{method}")
    module.train(params, out_dir=Path(params.paths.train) / method)


if __name__ == "__main__":
    run_stage("train", main)
