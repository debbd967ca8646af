"""`export`: ONNX export of a chosen model to `<paths.export>/onnx/<name>/`."""

from typing import Literal

from pydantic import Field, model_validator

from sdpipe.config.section import Section

# The opsets each torch exporter can write (torch 2.13): the TorchScript exporter stops at 20, the dynamo
# exporter starts at 18.
TORCHSCRIPT_OPSETS = range(14, 21)
DYNAMO_OPSETS = range(18, 24)


class ToleranceParams(Section):
    """How far an exported component may be from its PyTorch module, per precision.

    Each component runs on random inputs in onnxruntime and in PyTorch (fp32); the error is the largest
    absolute difference divided by the largest absolute reference value (so it does not depend on the scale
    of the output).
    """

    fp32: float = Field(default=1e-3, gt=0)
    """Largest relative error allowed for an fp32 export."""

    fp16: float = Field(default=2e-2, gt=0)
    """Largest relative error allowed for an fp16 export (compared against the fp32 PyTorch module)."""

    image: float = Field(default=0.05, gt=0, le=1)
    """Largest mean absolute pixel difference (pixels in [0, 1]) between the onnxruntime and the PyTorch image
    of the end-to-end check."""


class ExportParams(Section):
    enabled: bool = True
    """Run the export. false: the stage writes an empty `onnx/` folder and `parity.json` saying it was skipped."""

    model: str = Field(default="base", pattern=r"^(base|train:[A-Za-z0-9_]+|merge:[A-Za-z0-9][A-Za-z0-9._-]*)$")
    """What to export: `base` (base.base_model), `train:<method>` (the diffusers folder a full-weights method
    writes under `<paths.train>/<method>/model/`), or `merge:<recipe>` (`<paths.merge>/<recipe>/model/`).
    The folder is `onnx/base`, `onnx/train-<method>` or `onnx/merge-<recipe>`."""

    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    """The torch exporter. `torchscript` (deprecated by torch since 2.9 but still shipped) exports the UNet about
    ten times faster and gives the graph patterns onnxruntime's Stable Diffusion optimizer fuses (attention is
    fused only in its graphs); `dynamo` (torch's default, needs the onnxscript package) is the future path."""

    opset: int = 17
    """ONNX opset: 14 to 20 with the torchscript exporter, 18 to 23 with dynamo."""

    precision: Literal["fp32", "fp16"] = "fp32"
    """Weights and compute of the exported graphs. fp16 halves the size and is what runs fast on CUDA; the
    inputs and outputs stay fp32 (onnxruntime casts at the graph boundary)."""

    optimize: bool = False
    """Run onnxruntime's Stable Diffusion graph optimizer (fused multi-head attention, GroupNorm, BiasSplitGelu,
    NHWC convolutions). The fused operators run only on onnxruntime's CUDAExecutionProvider, so the parity check
    (and the export) needs onnxruntime-gpu and a CUDA device."""

    external_data: Literal["auto", "always"] = "auto"
    """Where the weights go: `auto` keeps them inside `model.onnx` unless the component is over protobuf's 2 GB
    limit (SD 1.5's fp32 UNet is), then writes them to one `weights.pb` beside it; `always` does that for every
    component."""

    tolerance: ToleranceParams = Field(default_factory=ToleranceParams)
    """Parity thresholds; the stage fails, writing nothing, when a component or the end-to-end image is outside."""

    check_prompt: str = "a red circle"
    """Prompt of the end-to-end check: one image from onnxruntime and one from PyTorch, same seed and scheduler."""

    check_steps: int = Field(default=10, ge=0)
    """Sampling steps of the end-to-end check (0 skips it)."""

    @model_validator(mode="after")
    def _opset_fits_the_exporter(self) -> "ExportParams":
        allowed = TORCHSCRIPT_OPSETS if self.exporter == "torchscript" else DYNAMO_OPSETS
        if self.opset not in allowed:
            raise ValueError(
                f"opset {self.opset} is not available with the {self.exporter} exporter; "
                f"use {allowed.start} to {allowed.stop - 1}"
            )
        return self
