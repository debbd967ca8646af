"""Per-block merge weights in supermerger's MBW convention (merge block weighted), and which block a key is in.

A block-weighted merge gives the UNet's blocks their own alpha. The 26 block ids, in supermerger's order, are

    BASE, IN00 ... IN11, M00, OUT00 ... OUT11

and address original-layout keys (see `block_of`):

    model.diffusion_model.input_blocks.N.*    INnn  (conv_in is IN00)
    model.diffusion_model.time_embed.*        IN00  (as supermerger does)
    model.diffusion_model.middle_block.*      M00
    model.diffusion_model.output_blocks.N.*   OUTnn
    model.diffusion_model.out.*               OUT11 (the final norm and conv; OUT11 in any model)
    everything else (text encoder, VAE)       BASE

SD 1.x/2.x UNets have all 25 UNet blocks. Smaller UNets have fewer: the tiny world's (2 levels, 1 layer per
block) has IN00-IN03, M00, OUT00-OUT03 and OUT11 (its `out.*`). A weight list of 26 (a supermerger preset)
works on any model and its entries for absent blocks go unused; a mapping that names an absent block is an
error, since that weight would silently do nothing.
"""

from __future__ import annotations

import re

from sdpipe.errors import SdpipeError

BLOCK_IDS: tuple[str, ...] = (
    "BASE",
    *(f"IN{index:02d}" for index in range(12)),
    "M00",
    *(f"OUT{index:02d}" for index in range(12)),
)
UNET_PREFIX = "model.diffusion_model."  # = sdpipe.models.single_file.UNET_PREFIX (kept free of torch imports)
UNET_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_of(key: str) -> str:
    """The block id whose weight applies to an original-layout key (may be past OUT11 in a non-SD UNet)."""
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    name = key[len(UNET_PREFIX) :]
    if name.startswith("time_embed."):
        return "IN00"
    if name.startswith("out."):
        return "OUT11"
    match = UNET_BLOCK.match(name)
    if match is None:
        return "BASE"  # e.g. SD 2.x unCLIP's label_emb, as supermerger does
    kind, index = match[1], int(match[2])
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{index:02d}"


def check_block_weights(value: float | list[float] | dict[str, float]) -> float | list[float] | dict[str, float]:
    """Params validation of a merge weight: one number, 26 numbers, or a mapping of block ids that has BASE."""
    if isinstance(value, list) and len(value) != len(BLOCK_IDS):
        raise ValueError(
            f"expected one number or {len(BLOCK_IDS)} block weights (BASE, IN00-IN11, M00, OUT00-OUT11, in "
            f"supermerger's order), got {len(value)}"
        )
    if isinstance(value, dict):
        unknown = [block for block in value if block not in BLOCK_IDS]
        if unknown:
            raise ValueError(f"unknown block ids {unknown}; expected BASE, IN00-IN11, M00 or OUT00-OUT11")
        if "BASE" not in value:
            raise ValueError("a block weight mapping needs BASE: the weight of every block it does not name")
    return value


class BlockWeight:
    """A merge weight (`alpha`, `beta`) that is one number for every key or one number per block."""

    def __init__(self, value: float | list[float] | dict[str, float], params_key: str):
        self.params_key = params_key
        self.named: set[str] = set()
        if isinstance(value, (int, float)):
            self.by_block = dict.fromkeys(BLOCK_IDS, float(value))
        elif isinstance(value, list):
            self.by_block = dict(zip(BLOCK_IDS, map(float, value), strict=True))
        else:
            self.by_block = {block: float(value.get(block, value["BASE"])) for block in BLOCK_IDS}
            self.named = set(value) - {"BASE"}
        self.per_block = not isinstance(value, (int, float))

    def check_blocks(self, keys) -> list[str]:
        """Checks the weights against a model's keys; returns the block ids that have a weight but no keys.

        A mapping naming an absent block, and a key in a block past OUT11, are errors.
        """
        present = {block_of(key) for key in keys}
        unknown = sorted(present - set(BLOCK_IDS))
        if unknown:
            raise SdpipeError(
                f"{self.params_key}: the UNet has blocks {unknown}, beyond supermerger's IN00-IN11/OUT00-OUT11; "
                "block weights only fit SD 1.x/2.x-shaped UNets (use one number)"
            )
        absent = [block for block in BLOCK_IDS if block not in present]
        named_absent = [block for block in absent if block in self.named]
        if named_absent:
            has = ", ".join(block for block in BLOCK_IDS if block in present)
            raise SdpipeError(
                f"{self.params_key}: sets a weight for {', '.join(named_absent)}, which this model does not have "
                f"(its blocks: {has}); remove those entries"
            )
        return absent if self.per_block else []

    def __call__(self, key: str) -> float:
        return self.by_block[block_of(key)]
