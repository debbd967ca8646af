"""The training data: cached VAE latents and their captions, served as an endless stream of shuffled batches.

`load_examples` pairs each caption row of `<captions>/<name>.jsonl` with its latents (and flipped latents) in
`<latents>/<name>.safetensors`, for one or more datasets. `LatentBatches.batch(index)` is the `index`-th batch
of the stream: every epoch visits each example once in a fresh order (seeded by the epoch), batches hold latents
of one shape (aspect buckets), and a partial batch is filled up from the start of its bucket. A batch depends
only on the seed and its index, which makes resuming exact. `PriorPreservation` holds the class images that a
method (DreamBooth) trains beside its own, as a second stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpipe.data.captions import load_captions
from sdpipe.encode import FLIP_SUFFIX, TIME_IDS_SUFFIX, load_latents
from sdpipe.errors import SdpipeError
from sdpipe.training.rng import torch_generator


@dataclass(frozen=True)
class Example:
    key: str
    """`<dataset>/<image id>`."""
    latents: torch.Tensor
    """Scaled VAE latents [C, h, w], fp32."""
    flipped: torch.Tensor | None
    """The latents of the left-right flipped image, when `encode` cached them."""
    caption: str
    time_ids: torch.Tensor | None = None
    """SDXL's size and crop conditioning of the image ([6]), when `encode` cached it (for SDXL bases)."""
    flipped_time_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class PriorPreservation:
    """Class images trained beside a method's own images (DreamBooth's prior preservation).

    Each micro-batch pairs the method's images with as many class images (their own seeded stream, captions used
    as they are), and the loss is the images' loss plus `loss_weight` × the class images' loss.
    """

    examples: list[Example]
    files: list[Path]
    """The files the examples were read from (a change to them makes checkpoints stale)."""
    loss_weight: float


@dataclass(frozen=True)
class Batch:
    latents: torch.Tensor
    """[B, C, h, w], fp32, on the CPU."""
    captions: list[str]
    keys: list[str]
    time_ids: torch.Tensor | None = None
    """[B, 6]: each image's SDXL size and crop conditioning (None for families without it)."""

    def rows(self, index) -> Batch:
        """The rows `index` (a slice) selects."""
        time_ids = None if self.time_ids is None else self.time_ids[index]
        return Batch(self.latents[index], self.captions[index], self.keys[index], time_ids)


def load_examples(
    latents_dir: Path, captions_dir: Path, datasets: list[str], base_model: str | None = None
) -> list[Example]:
    """Every captioned image of `datasets`, in caption-file order.

    When the latents file records the base model it was encoded with and `base_model` is given, the two must match.
    """
    examples = []
    for name in datasets:
        latents_path = Path(latents_dir) / f"{name}.safetensors"
        captions_path = Path(captions_dir) / f"{name}.jsonl"
        latents, metadata = load_latents(latents_path)
        encoded_with = metadata.get("base_model")
        if base_model is not None and encoded_with is not None and encoded_with != base_model:
            raise SdpipeError(
                f"{latents_path} was encoded with the base model {encoded_with!r} but base.base_model is "
                f"{base_model!r}; run the `encode` stage again (dvc repro encode)"
            )
        for row in load_captions(captions_path):
            if row["id"] not in latents:
                raise SdpipeError(
                    f"{captions_path}: image {row['id']!r} has no latents in {latents_path}; run `encode` again"
                )
            flipped = latents.get(row["id"] + FLIP_SUFFIX)
            examples.append(
                Example(
                    key=f"{name}/{row['id']}",
                    latents=latents[row["id"]].float(),
                    flipped=flipped.float() if flipped is not None else None,
                    caption=row["caption"] or "",
                    time_ids=latents.get(row["id"] + TIME_IDS_SUFFIX),
                    flipped_time_ids=latents.get(row["id"] + FLIP_SUFFIX + TIME_IDS_SUFFIX),
                )
            )
    if not examples:
        raise SdpipeError(f"no training images in {', '.join(datasets)} ({captions_dir}); check base.datasets")
    return examples


class LatentBatches:
    """The endless, seeded stream of training batches over `examples`."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, flip: bool):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for index, example in enumerate(examples):
            self.buckets.setdefault(tuple(example.latents.shape), []).append(index)
        self.batches_per_epoch = sum(math.ceil(len(indices) / batch_size) for indices in self.buckets.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch (example indices), in the order the epoch visits them."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        generator = torch_generator(self.seed, "epoch", epoch)
        batches = []
        for shape in sorted(self.buckets):
            indices = self.buckets[shape]
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            count = math.ceil(len(order) / self.batch_size)
            filled = (order * math.ceil(count * self.batch_size / len(order)))[: count * self.batch_size]
            batches += [filled[k * self.batch_size : (k + 1) * self.batch_size] for k in range(count)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch = (epoch, batches)
        return batches

    def batch(self, index: int) -> Batch:
        """The `index`-th batch of the stream, flipped latents chosen at random (seeded by `index`) when present."""
        epoch, position = divmod(index, self.batches_per_epoch)
        indices = self.epoch_batches(epoch)[position]
        coins = torch.rand(len(indices), generator=torch_generator(self.seed, "flip", index)).tolist()
        latents, time_ids = [], []
        for example_index, coin in zip(indices, coins):
            example = self.examples[example_index]
            use_flipped = self.flip and example.flipped is not None and coin < 0.5
            latents.append(example.flipped if use_flipped else example.latents)
            time_ids.append(example.flipped_time_ids if use_flipped else example.time_ids)
        return Batch(
            latents=torch.stack(latents),
            captions=[self.examples[i].caption for i in indices],
            keys=[self.examples[i].key for i in indices],
            time_ids=None if any(ids is None for ids in time_ids) else torch.stack(time_ids),
        )
