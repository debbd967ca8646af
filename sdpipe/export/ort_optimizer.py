"""Graph rewrites after the torch export: onnxruntime's Stable Diffusion fusions, and fp16 conversion.

The fusions are those of onnxruntime's `models/stable_diffusion/optimize_pipeline.py`: multi-head attention
(packed K/V in fp16), GroupNorm and SkipGroupNorm, BiasSplitGelu, BiasAdd, NHWC convolutions. They are
onnxruntime contrib operators with CUDA kernels only, so an optimized export runs on the CUDAExecutionProvider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

# What onnxruntime's optimizer calls each component.
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}


def optimize_for_cuda(path: Path, component: str, fp16: bool) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The fused graph of `path` (fp16 when asked) and how many of each fused operator it has."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    if model_type == "unet":
        # Packed K/V (and QKV) inputs are what the fp16 attention kernels want; fp32 keeps them separate.
        options.enable_packed_kv = fp16
        options.enable_packed_qkv = fp16
    with integer_head_counts():
        optimized = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=0,  # read from the graph
            hidden_size=0,
            opt_level=0,  # the python fusions only: the saved graph must stay runnable on any provider setup
            optimization_options=options,
            use_gpu=True,
        )
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
    return optimized.model, optimized.get_fused_operator_statistics()


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 inputs and outputs (onnxruntime's converter, casts at the boundary)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(model)
    converted.convert_float_to_float16(keep_io_types=True)
    return converted.model


@contextlib.contextmanager
def integer_head_counts() -> Iterator[None]:
    """Works around onnxruntime (<= 1.32) calling `int()` on a one-element array when it reads a UNet attention's
    head count from a PyTorch 2 graph, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted").

    onnxruntime's transformer tools import each other by bare module name (`fusion_attention_unet`), so that is
    the module patched, for the duration of one optimization.
    """
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts onnxruntime/transformers on sys.path)
    import fusion_attention_unet

    fusion = fusion_attention_unet.FusionAttentionUnet
    original = fusion.get_num_heads

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            concat = self.model.get_parent(reshape_q, 1)
            if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
                value = self.model.get_constant_value(concat.input[2])
                if isinstance(value, np.ndarray) and value.size == 1 and int(value.item()) > 0:
                    return int(value.item())
            return 0
        return original(self, reshape_q, is_torch2)

    fusion.get_num_heads = get_num_heads
    try:
        yield
    finally:
        fusion.get_num_heads = original
