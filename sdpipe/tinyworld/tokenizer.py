"""The tiny world's CLIP BPE tokenizer: 310 merges learned on the world's captions and some common words, and three
for the cross's rare word `plus`.

It is in CLIP's own format (vocab.json + merges.txt), so the stock `CLIPTokenizer` loads it and every stage takes
the same code path as with a real SD 1.x tokenizer. The vocabulary is laid out the way OpenAI CLIP lays out its
own: the 256 byte characters, the same with the end-of-word mark `</w>`, one entry per merge, then the two special
tokens. The files ship in `clip_tokenizer/` rather than being learned at each `pretrain`: the `tokenizers` BPE
trainer breaks ties between equally frequent pairs in hash-map order, so two runs numbered a few tokens
differently, and a text encoder trained with one numbering is wrong with the other.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 32
FILES = Path(__file__).with_name("clip_tokenizer")


def tokenizer_digest() -> str:
    """Hash of the shipped vocabulary and merges: a model trained on one numbering is wrong with another."""
    digest = hashlib.sha256()
    for name in ("vocab.json", "merges.txt"):
        digest.update((FILES / name).read_bytes())
    return digest.hexdigest()[:12]


def build_clip_tokenizer(out_dir: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Saves the tiny world's CLIPTokenizer to `out_dir` and returns it. SDXL's second tokenizer pads with `!`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(FILES / name, out_dir / name)
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"),
        merges=str(out_dir / "merges.txt"),
        model_max_length=MODEL_MAX_LENGTH,
        pad_token=pad_token,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
