"""Per-block merge weights in supermerger's MBW convention (merge block weighted), and which block a key is in.

A block-weighted merge gives the UNet's blocks their own alpha. Each model family has its block list, in
supermerger's order:

    SD 1.x/2.x (26)   BASE, IN00 ... IN11, M00, OUT00 ... OUT11
    SDXL (20)         BASE, IN00 ... IN08, M00, OUT00 ... OUT08

and the ids address original-layout keys (see `block_of`):

    model.diffusion_model.input_blocks.N.*    INnn  (conv_in is IN00)
    model.diffusion_model.time_embed.*        IN00  (as supermerger does)
    model.diffusion_model.label_emb.*         SDXL: IN00 (its size and pooled-text embedding, as supermerger
                                              does); SD: BASE (SD 2.x unCLIP's, as supermerger does)
    model.diffusion_model.middle_block.*      M00
    model.diffusion_model.output_blocks.N.*   OUTnn
    model.diffusion_model.out.*               the last OUT (the final norm and conv): OUT11, SDXL's OUT08
    everything else (text encoders, VAE)      BASE

SD 1.x/2.x UNets have all 25 UNet blocks, SDXL's all 19. Smaller UNets have fewer: the tiny world's (2 levels, 1
layer per block) has IN00-IN03, M00, OUT00-OUT03 and OUT11 (its `out.*`). A weight list of the family's length (a
supermerger preset) works on any model of the family and its entries for absent blocks go unused; a list of the
other family's length, or a mapping that names a block the model does not have, is an error, since those weights
would silently do nothing (supermerger cuts a 26-list down for SDXL; sdpipe asks for SDXL's own list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdpipe.errors import SdpipeError


def block_ids(inputs: int, outputs: int) -> tuple[str, ...]:
    """BASE, IN00 ..., M00, OUT00 ...: the block list of a UNet with `inputs` input and `outputs` output blocks."""
    return ("BASE", *(f"IN{i:02d}" for i in range(inputs)), "M00", *(f"OUT{i:02d}" for i in range(outputs)))


@dataclass(frozen=True)
class BlockList:
    """A family's block ids in supermerger's order, and the block of its UNet's `label_emb`."""

    title: str
    ids: tuple[str, ...]
    label_emb: str

    def names(self) -> str:
        """`SDXL: BASE, IN00-IN08, M00, OUT00-OUT08`."""
        ins = [block for block in self.ids if block.startswith("IN")]
        outs = [block for block in self.ids if block.startswith("OUT")]
        return f"{self.title}: BASE, {ins[0]}-{ins[-1]}, M00, {outs[0]}-{outs[-1]}"


BLOCK_LISTS = {  # by family name (sdpipe.families)
    "sd": BlockList("SD 1.x/2.x", block_ids(12, 12), label_emb="BASE"),
    "sdxl": BlockList("SDXL", block_ids(9, 9), label_emb="IN00"),
}
BLOCK_IDS: tuple[str, ...] = BLOCK_LISTS["sd"].ids
UNET_PREFIX = "model.diffusion_model."  # = sdpipe.models.single_file.UNET_PREFIX (kept free of torch imports)
UNET_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_of(key: str, family: str = "sd") -> str:
    """The block id whose weight applies to an original-layout key of a model of `family` (may be past the last
    IN/OUT block of the family's list in a UNet of another shape)."""
    blocks = BLOCK_LISTS[family]
    if not key.startswith(UNET_PREFIX):
        return "BASE"
    name = key[len(UNET_PREFIX) :]
    if name.startswith("time_embed."):
        return "IN00"
    if name.startswith("label_emb."):
        return blocks.label_emb
    if name.startswith("out."):
        return blocks.ids[-1]
    match = UNET_BLOCK.match(name)
    if match is None:
        return "BASE"
    kind, index = match[1], int(match[2])
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{index:02d}"


def check_block_weights(value: float | list[float] | dict[str, float]) -> float | list[float] | dict[str, float]:
    """Params validation of a merge weight: one number, a family's block list (26 or 20 numbers), or a mapping of
    block ids that has BASE. Whether the list or ids fit the inputs' family is checked when the recipe runs."""
    sd, sdxl = BLOCK_LISTS["sd"], BLOCK_LISTS["sdxl"]
    if isinstance(value, list) and len(value) not in (len(sd.ids), len(sdxl.ids)):
        raise ValueError(
            f"expected one number, {len(sd.ids)} block weights ({sd.names()}) or {len(sdxl.ids)} ({sdxl.names()}), "
            f"in supermerger's order, got {len(value)}"
        )
    if isinstance(value, dict):
        unknown = [block for block in value if block not in BLOCK_IDS]
        if unknown:
            raise ValueError(f"unknown block ids {unknown}; expected BASE, IN00-IN11, M00 or OUT00-OUT11")
        if "BASE" not in value:
            raise ValueError("a block weight mapping needs BASE: the weight of every block it does not name")
    return value


class BlockWeight:
    """A merge weight (`alpha`, `beta`) that is one number for every key or one number per block of the inputs'
    family (`sd`, `sdxl`). A list of another length than the family's, or a mapping naming a block the family has
    not, is an error naming `params_key`."""

    def __init__(self, value: float | list[float] | dict[str, float], params_key: str, family: str = "sd"):
        self.params_key = params_key
        self.family = family
        self.blocks = BLOCK_LISTS[family]
        ids = self.blocks.ids
        self.named: set[str] = set()
        if isinstance(value, (int, float)):
            self.by_block = dict.fromkeys(ids, float(value))
        elif isinstance(value, list):
            if len(value) != len(ids):
                raise SdpipeError(
                    f"{params_key}: {len(value)} block weights, but the inputs are {self.blocks.title} models, whose "
                    f"block list has {len(ids)} ({self.blocks.names()}, in supermerger's order)"
                )
            self.by_block = dict(zip(ids, map(float, value), strict=True))
        else:
            foreign = [block for block in value if block not in ids]
            if foreign:
                raise SdpipeError(
                    f"{params_key}: sets a weight for {', '.join(foreign)}, which is not in the block list of "
                    f"{self.blocks.title} ({self.blocks.names()}); the inputs are {self.blocks.title} models"
                )
            self.by_block = {block: float(value.get(block, value["BASE"])) for block in ids}
            self.named = set(value) - {"BASE"}
        self.per_block = not isinstance(value, (int, float))

    def check_blocks(self, keys) -> list[str]:
        """Checks the weights against a model's keys; returns the block ids that have a weight but no keys.

        A mapping naming an absent block, and a key in a block past the family's last IN/OUT block, are errors.
        """
        ids = self.blocks.ids
        present = {block_of(key, self.family) for key in keys}
        unknown = sorted(present - set(ids))
        if unknown:
            raise SdpipeError(
                f"{self.params_key}: the UNet has blocks {unknown}, beyond supermerger's {self.blocks.names()}; block "
                f"weights only fit {self.blocks.title}-shaped UNets (use one number)"
            )
        absent = [block for block in ids if block not in present]
        named_absent = [block for block in absent if block in self.named]
        if named_absent:
            has = ", ".join(block for block in ids if block in present)
            raise SdpipeError(
                f"{self.params_key}: sets a weight for {', '.join(named_absent)}, which this model does not have "
                f"(its blocks: {has}); remove those entries"
            )
        return absent if self.per_block else []

    def __call__(self, key: str) -> float:
        return self.by_block[block_of(key, self.family)]
