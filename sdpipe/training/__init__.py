"""The training core every method shares: data, noise and loss, optimizer, checkpoints, samples, metrics.

A method subclasses `TrainingMethod` (the seam, in `sdpipe.training.method`) and calls
`run_training(params, method, out_dir)` (`sdpipe.training.loop`).
"""

from sdpipe.training.loop import CHECKPOINTS_DIR, LIVE_DIR, METRICS_FILE, MODEL_DIR, SAMPLES_DIR, run_training
from sdpipe.training.method import Models, TrainingMethod

__all__ = [
    "CHECKPOINTS_DIR",
    "LIVE_DIR",
    "METRICS_FILE",
    "MODEL_DIR",
    "SAMPLES_DIR",
    "Models",
    "TrainingMethod",
    "run_training",
]
