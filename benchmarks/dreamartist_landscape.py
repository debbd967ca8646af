"""DreamArtist's guided loss along the way from its starting point to a vector that draws the concept.

DreamArtist trains a positive and a negative embedding with guidance inside the loss: the prediction compared with
the noise is eps_neg + cfg_scale × (eps_pos − eps_neg). This benchmark asks whether that objective favours the
concept at all on the tiny world's base: with the negative embedding held at its start (the initializer word), it
moves the positive one from the same start toward the vector textual inversion learned for the concept (which
draws it) and prints the guided loss at each point, averaged over fixed noise and timestep draws on the concept's
cached latents, with the textual-inversion loss (guidance 1, no negative) beside it. If the guided loss rises along
the way, the objective's minimum sits near "no difference between the two predictions" and DreamArtist cannot be
expected to find the concept however long it trains.

Needs the default pipeline's `prepare`, `caption`, `encode` and `train@textual_inversion` outputs. About 2 minutes on
two CPU cores at the defaults.

    python benchmarks/dreamartist_landscape.py [--dataset cross] [--draws 48] [--cfg 7.5 3.0]
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdpipe.config import load_params
from sdpipe.config.train import DreamArtistParams
from sdpipe.methods.dreamartist import DreamArtist
from sdpipe.training.data import Batch
from sdpipe.training.loop import batch_loss, load_models

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 1.0)


def dataset_batch(params, dataset: str) -> Batch:
    """Every (unflipped) image of `dataset`: its cached latents and captions."""
    with safe_open(str(Path(params.paths.latents) / f"{dataset}.safetensors"), "pt") as f:
        keys = [key for key in f.keys() if not key.endswith(".flip")]  # noqa: SIM118 (safe_open has no __contains__)
        latents = torch.stack([f.get_tensor(key) for key in keys])
    records = [json.loads(line) for line in (Path(params.paths.captions) / f"{dataset}.jsonl").read_text().splitlines()]
    captions = {record["id"]: record["caption"] for record in records}
    return Batch(latents=latents, captions=[captions[key] for key in keys], keys=keys)


def guided_losses(params, batch: Batch, learned: torch.Tensor, cfg_scale: float, draws: int) -> list[float]:
    """The mean loss over `draws` fixed draws at each of `FRACTIONS` of the way from the start to `learned`."""
    models = load_models(params.base, torch.device("cpu"))
    settings = {**params.train.dreamartist.model_dump(), "cfg_scale": cfg_scale, "num_vectors": 1,
                "negative_num_vectors": 1, "reconstruction_loss_weight": 0.0}
    method = DreamArtist(DreamArtistParams(**settings), params.base.base_model)
    method.setup(models)
    positive_id, negative_id = method.token_ids
    start = method.embeddings[negative_id].detach().clone()  # the initializer word (plus the reference's 1e-3 noise)
    captions = [method.caption(caption) for caption in batch.captions]
    common = params.train.common
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    losses = []
    with torch.no_grad():
        for fraction in FRACTIONS:
            method.embeddings[positive_id] = start + fraction * (learned - start)
            total = 0.0
            for draw in range(draws):
                loss, _ = batch_loss(method, models, batch, captions, None, torch.Generator().manual_seed(draw), common,
                                     accelerator)
                total += float(loss)
            losses.append(total / draws)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default="cross")
    parser.add_argument("--draws", type=int, default=48)
    parser.add_argument("--cfg", type=float, nargs="+", default=[7.5, 3.0])
    args = parser.parse_args()
    torch.set_num_threads(1)

    params = load_params(args.params)
    token = params.train.textual_inversion.placeholder_token.strip("<>")
    embedding_file = Path(params.paths.train) / "textual_inversion" / "model" / f"{token}.safetensors"
    learned = load_file(str(embedding_file))["emb_params"][0]
    batch = dataset_batch(params, args.dataset)
    print(f"{args.dataset}: {len(batch.keys)} images, {args.draws} draws; positive embedding moved from the start "
          f"toward {embedding_file} (negative held at the start)")
    print("cfg_scale  " + "  ".join(f"{fraction:>6.0%}" for fraction in FRACTIONS))
    for cfg_scale in [1.0, *args.cfg]:  # guidance 1: the textual-inversion loss (the negative has no effect)
        losses = guided_losses(params, batch, learned, cfg_scale, args.draws)
        print(f"{cfg_scale:9.1f}  " + "  ".join(f"{loss:6.4f}" for loss in losses), flush=True)


if __name__ == "__main__":
    main()
