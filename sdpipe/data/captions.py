"""Captions: filling in the missing ones (the `caption` stage) and changing them at training time.

`caption_dataset` reads a `prepare` manifest and writes one caption per image: the dataset's own caption
(a .txt sidecar or metadata) when there is one, else one made by the chosen backend (`template`,
`filename` or `blip`). `apply_caption_ops` is the one place where training methods shuffle, drop and
trigger captions (`CaptionOps`).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from PIL import Image

from sdpipe.config.caption import CaptionOps, CaptionParams
from sdpipe.errors import SdpipeError
from sdpipe.io import write_jsonl
from sdpipe.models.loading import resolve_device
from sdpipe.progress import log, track

MANIFEST_KEYS = ("id", "file", "source", "caption", "caption_source")
CAPTION_KEYS = ("id", "caption")


# --- the caption stage ---------------------------------------------------------------------------------


def caption_dataset(manifest_path: Path, out_path: Path, params: CaptionParams, device: str) -> list[dict]:
    """Writes `{id, file, caption, caption_source}` per manifest row, in manifest order, to `out_path`.

    Existing captions are kept (with their `caption_source`) unless `params.overwrite`; the others are made
    by `params.backend`, whose name becomes their `caption_source`. `device` is used by `blip` only.
    """
    manifest_path, out_path = Path(manifest_path), Path(out_path)
    rows = read_manifest(manifest_path)
    to_caption = [index for index, row in enumerate(rows) if params.overwrite or not has_caption(row)]
    new_captions = make_captions([rows[index] for index in to_caption], manifest_path.parent, params, device)
    made = dict(zip(to_caption, new_captions))

    out_rows = []
    for index, row in enumerate(rows):
        if index in made:
            caption, source = made[index], params.backend
        else:
            caption, source = row["caption"], row["caption_source"]
        out_rows.append({"id": row["id"], "file": row["file"], "caption": caption, "caption_source": source})
    write_jsonl(out_path, out_rows)
    log(f"{out_path}: {len(rows) - len(made)} captions kept, {len(made)} made by `{params.backend}`")
    return out_rows


def read_manifest(manifest_path: Path) -> list[dict]:
    """Reads a `prepare` manifest, checking that every row has the keys captioning needs."""
    if not manifest_path.is_file():
        raise SdpipeError(f"{manifest_path}: no manifest; run the `prepare` stage first")
    return read_rows(manifest_path, MANIFEST_KEYS, "re-run `prepare`")


def read_rows(path: Path, keys: tuple[str, ...], remedy: str) -> list[dict]:
    """Reads a JSON-lines file of rows with `keys` (a `caption`, when there is one, a string or null); a row that is
    not is an `SdpipeError` naming the file and line, followed by `remedy`."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise SdpipeError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); {remedy}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SdpipeError(f"{path}, line {number}: not valid JSON ({error.msg}); {remedy}") from None
        if not isinstance(row, dict):
            raise SdpipeError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}; {remedy}")
        missing = [key for key in keys if key not in row]
        if missing:
            raise SdpipeError(f"{path}, line {number}: missing {', '.join(missing)}; {remedy}")
        if not isinstance(row.get("caption"), (str, type(None))):
            raise SdpipeError(f"{path}, line {number}: `caption` is not a string; {remedy}")
        rows.append(row)
    return rows


def has_caption(row: dict) -> bool:
    return bool((row["caption"] or "").strip())


def make_captions(rows: list[dict], prepared_dir: Path, params: CaptionParams, device: str) -> list[str]:
    """One new caption per manifest row, from `params.backend`."""
    if not rows:
        return []
    if params.backend == "template":
        return [template_caption(params)] * len(rows)
    if params.backend == "filename":
        return [filename_caption(row["source"]) for row in rows]
    image_paths = [prepared_dir / row["file"] for row in rows]
    return blip_captions(image_paths, params, resolve_device(device))


def template_caption(params: CaptionParams) -> str:
    return params.template.format(token=params.token, class_word=params.class_word)


# A counter at the end of a file name: `-02`, ` 3`, ` (1)`, ` copy`.
TRAILING_COUNTER = re.compile(r"\s*(?:\(\d+\)|\bcopy\b|\d+)$", re.IGNORECASE)


def filename_caption(source: str) -> str:
    """The words of a file name: `sub/red_circle-02.png` → `red circle`.

    Underscores and dashes become spaces, and trailing counters and copy marks (`02`, `(1)`, `copy`) are
    removed, unless nothing would be left (`0003.png` → `0003`).
    """
    words = " ".join(re.sub(r"[_\-]+", " ", Path(source).stem).split())
    while True:
        shorter = TRAILING_COUNTER.sub("", words).strip()
        if shorter == words or not shorter:
            return words
        words = shorter


# --- the BLIP backend ----------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether Hugging Face Hub downloads are switched off (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in names)


def load_blip(model_name: str, device: str):
    """Loads a BLIP captioning model and its processor from a local folder or a hub id."""
    from safetensors import SafetensorError
    from transformers import BlipForConditionalGeneration, BlipProcessor

    is_folder = Path(model_name).is_dir()
    offline = hub_offline()
    try:
        processor = BlipProcessor.from_pretrained(model_name, local_files_only=is_folder or offline)
        model = BlipForConditionalGeneration.from_pretrained(
            model_name, local_files_only=is_folder or offline, use_safetensors=True  # pickled .bin is never read
        )
    except (OSError, ValueError, SafetensorError) as error:
        if is_folder:
            raise SdpipeError(
                f"caption.blip_model: {model_name} is not a BLIP captioning model folder "
                f"(BlipForConditionalGeneration + BlipProcessor): {error}"
            ) from None
        if offline:
            where = "offline mode is on (HF_HUB_OFFLINE)"
        else:
            where = "it could not be downloaded (offline, or no such repo?)"
        raise SdpipeError(
            f"caption.blip_model: `{model_name}` is not a local folder, so it was taken as a Hugging Face hub id, "
            f"but it is not in the local cache and {where}. Download it first, or set caption.blip_model to a "
            f"local model folder."
        ) from None
    return model.to(device).eval(), processor


def blip_captions(image_paths: list[Path], params: CaptionParams, device: str) -> list[str]:
    """Captions images with BLIP in batches of `params.blip_batch_size`, greedy decoding."""
    import torch

    model, processor = load_blip(params.blip_model, device)
    batch_size = params.blip_batch_size
    batches = [image_paths[start : start + batch_size] for start in range(0, len(image_paths), batch_size)]
    captions = []
    for batch in track(batches, "blip captions"):
        images = [open_rgb(path) for path in batch]
        if params.blip_prefix:
            inputs = processor(images=images, text=[params.blip_prefix] * len(images), return_tensors="pt")
        else:
            inputs = processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            token_ids = model.generate(
                **inputs.to(device), max_new_tokens=params.blip_max_new_tokens, do_sample=False, num_beams=1
            )
        texts = processor.batch_decode(token_ids, skip_special_tokens=True)
        captions += [with_prefix(" ".join(text.split()), params.blip_prefix) for text in texts]
    return captions


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise SdpipeError(f"{path}: cannot read this prepared image ({error}); re-run `prepare`") from None


def with_prefix(caption: str, prefix: str | None) -> str:
    """`caption`, starting with `prefix` (compared ignoring case, as BLIP's tokenizer lowercases)."""
    if not prefix or caption.lower().startswith(prefix.lower()):
        return caption
    return f"{prefix} {caption}".strip()


# --- at training time ----------------------------------------------------------------------------------


def load_captions(path: str | Path) -> list[dict]:
    """Reads a `caption` stage output: `{id, file, caption, caption_source}` rows, in manifest order."""
    path = Path(path)
    if not path.is_file():
        raise SdpipeError(f"{path}: no captions file; run the `caption` stage first")
    return read_rows(path, CAPTION_KEYS, "run the `caption` stage again")


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def apply_caption_ops(caption: str, ops: CaptionOps, rng: random.Random) -> str:
    """The caption one training step sees: trigger added, tags shuffled and dropped, or the caption dropped.

    Captions are comma-separated tags. Kept tags (the first `ops.keep_tokens`, and the one holding the
    trigger) stay in place and are never dropped. All randomness comes from `rng`, so the same rng state
    gives the same result; with the default `ops` the caption is returned unchanged and `rng` is not used.
    """
    if ops.caption_dropout and rng.random() < ops.caption_dropout:
        return ""
    if ops.trigger is None and not ops.shuffle_tags and not ops.tag_dropout:
        return caption

    tags = split_tags(caption)
    kept = set(range(min(ops.keep_tokens, len(tags))))
    if ops.trigger is not None:
        trigger_at = [i for i, tag in enumerate(tags) if contains_word(tag, ops.trigger)]
        if trigger_at:
            kept.update(trigger_at)
        else:
            tags.insert(0, ops.trigger)
            kept = {0} | {i + 1 for i in kept}

    free_positions = [i for i in range(len(tags)) if i not in kept]
    if ops.shuffle_tags:
        free_tags = [tags[i] for i in free_positions]
        rng.shuffle(free_tags)
        for position, tag in zip(free_positions, free_tags):
            tags[position] = tag
    if ops.tag_dropout:
        tags = [tag for i, tag in enumerate(tags) if i in kept or rng.random() >= ops.tag_dropout]
    return ", ".join(tags)
