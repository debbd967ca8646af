"""`sdpipe sample --method`: a trained method's files loaded as a user would, prompt files, A1111's PNG parameters."""

from __future__ import annotations

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.config import load_params
from sdpipe.methods import textual_inversion


def test_sample_a_trained_embedding_from_a_prompt_file(tmp_path, tiny_sd_dir, write_star_dataset):
    write_star_dataset(tmp_path)
    params_file = tmp_path / "params.yaml"
    params = {
        "paths": {key: str(tmp_path / key) for key in ("captions", "latents", "train")},
        "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
        "train": {
            "methods": ["textual_inversion"],
            "common": {"batch_size": 2, "checkpoint_every": 0, "sample_every": 0},
            "textual_inversion": {"max_steps": 2, "learning_rate": 0.5},
        },
    }
    params_file.write_text(yaml.safe_dump(params), encoding="utf-8")
    textual_inversion.train(load_params(params_file), tmp_path / "train" / "textual_inversion")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red <sks> shape\n\na red shape\n", encoding="utf-8")

    out = tmp_path / "images" / "star.png"
    out.parent.mkdir()
    args = ["sample", "--method", "textual_inversion", "--params", str(params_file), "--prompt-file", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--steps", "2", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "'<sks>'" in result.output  # the word that names the concept
    first, second = (Image.open(out.parent / f"star-{index:03d}.png") for index in range(2))
    assert first.text["parameters"] == (
        "a red <sks> shape\nSteps: 2, CFG scale: 7.5, Seed: 3, Size: 32x32, Model: textual_inversion"
    )
    assert second.text["parameters"].startswith("a red shape\n")
    assert not np.array_equal(np.asarray(first), np.asarray(second))  # the learned token changes the image

    missing = CliRunner().invoke(app, ["sample", "--method", "lora", "--params", str(params_file), "--prompt", "x"])
    assert missing.exit_code == 1 and "dvc repro train@lora" in missing.output
    unknown = CliRunner().invoke(app, ["sample", "--method", "nope", "--prompt", "x", "--params", str(params_file)])
    assert unknown.exit_code == 1 and "not a training method" in unknown.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    no_prompts = CliRunner().invoke(app, ["sample", "--model", str(tiny_sd_dir), "--prompt-file", str(empty)])
    assert no_prompts.exit_code == 1 and "no prompts" in no_prompts.output
