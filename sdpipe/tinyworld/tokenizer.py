"""A small CLIP BPE tokenizer for the tiny world, trained offline with the `tokenizers` library.

It is saved in CLIP's own format (vocab.json + merges.txt), so the stock `CLIPTokenizer` loads it and every
stage takes the same code path as with a real SD 1.x tokenizer. The vocabulary is built the way OpenAI CLIP
builds its own: the 256 byte characters, the same with the end-of-word mark `</w>`, one entry per merge,
then the two special tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

from sdpipe.tinyworld import world

MODEL_MAX_LENGTH = 32
NUM_MERGES = 600

# General words so that ordinary prompts tokenize into whole words, not only the world's vocabulary.
COMMON_WORDS = """
a an the of in on at with and or by for to from is are photo picture image painting drawing sketch render
style art artwork shape object thing person man woman child cat dog bird tree house car flower sky water
sun moon star stars light dark bright small large big tiny huge little round sharp thick thin bold simple
outline outlined filled solid hollow line lines border edge color colour colors red green blue yellow orange
purple pink brown black white gray grey background top bottom left right middle center centre corner side
high low detailed quality best worst ugly beautiful blurry clear clean sks token concept new old
circle circles square squares triangle triangles rectangle oval dot point points five pointed
""".split()


def world_corpus() -> list[str]:
    """Captions of every attribute combination (held-out ones included) plus common words."""
    lines = []
    for size, color, shape, style in itertools.product(world.SIZES, world.COLORS, world.SHAPES, world.STYLES):
        scene = world.Scene(color=color, shape=shape, style=style, size=size, extent=12, cx=16, cy=16)
        lines.append(world.caption(scene, with_style=True))
        lines.append(world.caption(scene, with_size=False, with_style=True, with_position=True))
    lines.extend(COMMON_WORDS)
    return lines


def build_clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Trains the BPE merges on the world corpus and saves a CLIPTokenizer to `out_dir`."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=len(ByteLevel.alphabet()) * 2 + NUM_MERGES,
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(world_corpus() * 4, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    byte_chars = [chr(c) for c in _byte_unicode_points()]
    vocab_tokens = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab_tokens)
    kept_merges = []
    for left, right in merges:
        if left in seen and right in seen and left + right not in seen:
            kept_merges.append((left, right))
            vocab_tokens.append(left + right)
            seen.add(left + right)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept_merges))
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"),
        merges=str(out_dir / "merges.txt"),
        model_max_length=MODEL_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _byte_unicode_points() -> list[int]:
    """GPT-2/CLIP's reversible byte -> printable unicode code point table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    points, extra = [], 0
    for byte in range(256):
        if byte in printable:
            points.append(byte)
        else:
            points.append(256 + extra)
            extra += 1
    return points
