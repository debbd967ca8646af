"""Writing diffusers pipeline folders that both transformers majors read.

transformers 5 made `CLIPTextModel` the text transformer itself, so its `save_pretrained` writes the text encoder's
keys without the `text_model.` prefix (`encoder.layers.0…`). transformers 4, which many users' stacks still pin
(kohya's sd-scripts, older A1111 and ComfyUI installs), expects `text_model.encoder.layers.0…`, finds none of its
keys, and loads the text encoder with random weights, with only a warning. transformers 5 reads the prefixed layout
too (the layout of every SD 1.x/2.x folder on the Hub), so sdpipe writes every `CLIPTextModel` file in it.
`CLIPTextModelWithProjection` (SDXL's second encoder) and the vision models keep their prefixes in both majors.

Tokenizers likewise: transformers 5 writes a CLIP tokenizer as `tokenizer.json` alone, which transformers 4's
`CLIPTokenizer` (the class every SD `model_index.json` names, and what optimum's ONNX pipelines load) cannot read;
sdpipe also writes CLIP's own `vocab.json` and `merges.txt`, as the folders on the Hub have them.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from sdpipe.io import DTYPES_BY_NAME, SafetensorsWriter, atomic_path

TEXT_MODEL_PREFIX = "text_model."
TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
"""The transformers classes whose state-dict keys lost `text_model.` in transformers 5."""


def transformers4_text_key(key: str) -> str:
    """A `CLIPTextModel` state-dict key as transformers 4 names it."""
    return key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key


def save_pipeline(pipeline, folder: str | Path) -> None:
    """`pipeline.save_pretrained(folder)` (safetensors), with every `CLIPTextModel` in transformers 4's key layout."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    for name, component in pipeline.components.items():
        if type(component).__name__ in TEXT_ENCODER_CLASSES:
            prefix_text_model_keys(folder / name)
        if getattr(component, "backend_tokenizer", None) is not None:
            write_bpe_vocabulary(component, folder / name)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, readable by transformers 4 too (`write_bpe_vocabulary`)."""
    tokenizer.save_pretrained(folder)
    write_bpe_vocabulary(tokenizer, Path(folder))


def write_bpe_vocabulary(tokenizer, folder: Path) -> None:
    """Writes a saved BPE tokenizer's `vocab.json` and `merges.txt` (CLIP's own files) beside its `tokenizer.json`,
    unless the folder has them; other tokenizers are left as they are."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or (folder / "vocab.json").exists():
        return
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def prefix_text_model_keys(component_folder: str | Path) -> None:
    """Rewrites the weights of a saved `CLIPTextModel` folder with `text_model.`-prefixed keys (same tensors, same
    metadata); a file already in that layout is left as it is."""
    files = sorted(Path(component_folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{component_folder}: no .safetensors weights to rewrite")
    if (Path(component_folder) / "model.safetensors.index.json").exists():
        raise NotImplementedError(f"{component_folder}: sharded text encoder weights")  # never at CLIP's sizes
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            if all(key.startswith(TEXT_MODEL_PREFIX) for key in f.keys()):  # noqa: SIM118
                continue
            originals = {transformers4_text_key(key): key for key in f.keys()}  # noqa: SIM118
            layout = {
                key: (tuple(f.get_slice(original).get_shape()), DTYPES_BY_NAME[f.get_slice(original).get_dtype()])
                for key, original in originals.items()
            }
            with atomic_path(path) as tmp, SafetensorsWriter(tmp, layout, f.metadata()) as writer:
                for key in writer.order:  # one tensor at a time: the model's copy in memory is all there is
                    writer.write(key, f.get_tensor(originals[key]))
