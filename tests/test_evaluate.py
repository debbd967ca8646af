"""The evaluate stages: the scoreboard's figures against an independent re-computation on a few images; one model per
stage; the oracle off imports no tiny-world code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from sdpipe.config import parse_params
from sdpipe.encode import save_safetensors
from sdpipe.errors import SdpipeError
from sdpipe.evaluate import (
    DinoScorer,
    evaluate_model,
    evaluate_models,
    frechet_distance,
    kernel_inception_distance,
    summarize,
    write_summary,
)
from sdpipe.io import write_jsonl
from sdpipe.tinyworld import oracle, world
from sdpipe.tinyworld.datasets import subject_scenes

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 2
STEPS = 2
SCOREBOARD_ADDS = {"prior_preservation", "base_rate", "x_base"}  # what the scoreboard adds to a model's metrics


def test_kid_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=generator), torch.randn(9, 5, generator=generator) + 0.5

    def k(a, b):
        return (float(np.dot(a, b)) / 5 + 1) ** 3

    xs, ys = x.double().numpy(), y.double().numpy()
    same_x = sum(k(xs[i], xs[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    same_y = sum(k(ys[i], ys[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    cross = sum(k(a, b) for a in xs for b in ys) / (7 * 9)
    assert kernel_inception_distance(x, y) == pytest.approx(same_x + same_y - 2 * cross, rel=1e-9)
    assert abs(kernel_inception_distance(x, x[torch.randperm(7)])) < kernel_inception_distance(x, y)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """Prepared star images, star_val latents and captions, a random CLIP, and a textual-inversion embedding."""
    root = tmp_path_factory.mktemp("eval")
    prepared = root / "prepared" / "star"
    (prepared / "images").mkdir(parents=True)
    rows = []
    for index, scene in enumerate(subject_scenes(count=4)):
        world.render(scene).save(prepared / "images" / f"star_{index}.png")
        rows.append({"id": f"star_{index}", "file": f"images/star_{index}.png", "width": 32, "height": 32})
    write_jsonl(prepared / "manifest.jsonl", rows)

    val = root / "val"
    write_star_dataset(val, count=3)
    (root / "latents").mkdir()
    (val / "latents" / "star.safetensors").rename(root / "latents" / "star_val.safetensors")
    (root / "captions").mkdir()
    (val / "captions" / "star.jsonl").rename(root / "captions" / "star_val.jsonl")

    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(root / "clip")

    embedding = root / "train" / "textual_inversion" / "model"
    embedding.mkdir(parents=True)
    save_safetensors({"emb_params": torch.randn(1, 64, generator=torch.Generator().manual_seed(1))},
                     embedding / "sks.safetensors")  # train.textual_inversion.placeholder_token <sks>
    return root


def eval_params_data(root, tiny_sd_dir, eval_dir=None, **evaluate) -> dict:
    paths = {key: f"{root}/{key}" for key in ("prepared", "captions", "latents", "train", "merge", "eval")}
    return {
        "paths": {**paths, "eval": str(eval_dir or paths["eval"])},
        "base": {"base_model": str(tiny_sd_dir), "datasets": ["star", "star_val"], "device": "cpu"},
        "train": {"methods": ["textual_inversion"]},
        "evaluate": {"seeds_per_prompt": SEEDS, "steps": STEPS, "clip_model": f"{root}/clip", **evaluate},
    }


def eval_params(root, tiny_sd_dir, eval_dir=None, **evaluate):
    return parse_params(eval_params_data(root, tiny_sd_dir, eval_dir, **evaluate))


@pytest.fixture(scope="module")
def summary(project, tiny_sd_dir):
    params = eval_params(project, tiny_sd_dir)
    rows = evaluate_models(params, torch.device("cpu"))
    write_summary(rows, project / "eval")
    return rows


def test_every_model_is_a_row_with_its_files(summary, project):
    assert list(summary) == ["base", "textual_inversion"]
    on_disk = json.loads((project / "eval" / "summary.json").read_text())
    assert on_disk == summary
    table = (project / "eval" / "summary.md").read_text()
    assert "| base |" in table and "| textual_inversion |" in table
    for name, metrics in summary.items():
        on_disk = json.loads((project / "eval" / "models" / name / "metrics.json").read_text())
        assert on_disk == {key: value for key, value in metrics.items() if key not in SCOREBOARD_ADDS}
        assert (project / "eval" / "grids" / name / f"{name}.png").is_file()
        assert metrics["images"] == (len(world.PRETRAIN_SHAPES) + 1) * len(world.COLORS) * SEEDS
        assert set(metrics) >= {"concept", "fidelity", "editability", "prior_preservation", "clip_t", "clip_i", "kid",
                                "validation_loss", "concept_rates", "base_rate"}
        assert metrics["concept"] == "star"  # textual_inversion trains on star here (its code default)
        assert set(metrics["concept_rates"]) == {"star", "cross", "outlined", "dark"}
        assert metrics["concept_rates"]["star"] == metrics["fidelity"]
        assert metrics["base_rate"] == summary["base"]["concept_rates"]["star"]
    assert summary["base"]["prior_preservation"] == 1.0


def test_the_figures_match_an_independent_recomputation(summary, tiny_sd_dir):
    """Sample the same prompts and seeds with a plain diffusers pipeline and count with the oracle directly."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def images_of(prompts):
        out = []
        for prompt in prompts:
            for seed in range(SEEDS):
                result = pipe(prompt, height=32, width=32, num_inference_steps=STEPS, guidance_scale=7.5,
                              generator=torch.Generator().manual_seed(seed))
                out.append(result.images[0])
        return out

    prior_prompts = [(color, shape) for shape in world.PRETRAIN_SHAPES for color in world.COLORS]
    readings = [oracle.read(image) for image in images_of([f"a {c} {s}" for c, s in prior_prompts])]
    expected = [pair for pair in prior_prompts for _ in range(SEEDS)]
    color = np.mean([r.color == c for r, (c, _) in zip(readings, expected)])
    joint = np.mean([(r.color, r.shape) == pair for r, pair in zip(readings, expected)])
    assert summary["base"]["color_accuracy"] == pytest.approx(color)
    assert summary["base"]["joint_accuracy"] == pytest.approx(joint)

    concept = [oracle.read(image) for image in images_of([f"a {c} sks shape" for c in world.COLORS])]
    assert summary["base"]["fidelity"] == pytest.approx(np.mean([r.shape == "star" for r in concept]))
    rates = summary["base"]["concept_rates"]
    assert rates["cross"] == pytest.approx(np.mean([r.shape == "cross" for r in concept]))
    assert rates["outlined"] == pytest.approx(np.mean([r.style == "outlined" for r in readings]))
    assert rates["dark"] == pytest.approx(np.mean([r.background == "dark" for r in readings]))


def test_each_row_is_scored_on_the_concept_its_method_learned():
    import yaml

    from sdpipe.evaluate import row_concept

    params = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    concepts = {name: row_concept(params, name) for name in ["base", *params.train.methods, "merge-dreambooth_finetune"]}
    assert concepts == {
        "base": "star", "textual_inversion": "cross", "dreamartist": "cross", "clip_inversion": "cross",
        "aesthetic_gradient": "dark", "hypernetwork": "outlined", "lora": "star", "dreambooth": "star",
        "finetune": "star", "custom_diffusion": "star", "null_text_inversion": "star", "merge-dreambooth_finetune": "star",
    }


def test_the_scoreboard_sets_the_base_rate_of_each_rows_concept_beside_it(project, tiny_sd_dir, tmp_path):
    params = eval_params(project, tiny_sd_dir, eval_dir=tmp_path)
    rows = {
        "base": {"concept": "star", "joint_accuracy": 0.8, "concept_rates": {"star": 0.0, "cross": 0.2, "dark": 0.1}},
        "textual_inversion": {"concept": "cross", "joint_accuracy": 0.4, "concept_rates": {"star": 0.0, "cross": 0.9}},
    }
    for name, metrics in rows.items():
        path = tmp_path / "models" / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(metrics))
    scored = summarize(params)
    assert scored["textual_inversion"]["base_rate"] == 0.2 and scored["textual_inversion"]["x_base"] == 4.5
    assert scored["textual_inversion"]["prior_preservation"] == 0.5
    assert scored["base"]["base_rate"] == 0.0 and "x_base" not in scored["base"]  # no ratio to a zero rate


def test_a_concept_is_a_shape_or_a_style_the_oracle_reads(project, tiny_sd_dir, tmp_path):
    with pytest.raises(Exception, match="exactly one of shape, style"):
        eval_params(project, tiny_sd_dir, concepts={"star": {"shape": "star", "style": "dark"}})
    params = eval_params(project, tiny_sd_dir, eval_dir=tmp_path, concepts={"star": {"shape": "hexagon"}})
    with pytest.raises(SdpipeError, match=r"evaluate.concepts.star.shape: the oracle reads .*not 'hexagon'"):
        evaluate_model(params, "base", torch.device("cpu"))


def test_a_validation_dataset_that_is_not_prepared_is_refused(project, tiny_sd_dir):
    params = eval_params(project, tiny_sd_dir, validation_datasets=["nope"])
    with pytest.raises(SdpipeError, match=r"evaluate.validation_datasets lists 'nope'"):
        evaluate_models(params, torch.device("cpu"))


def test_fid_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=generator), torch.randn(30, 6, generator=generator) * 1.5 + 0.3
    xs, ys = x.double().numpy(), y.double().numpy()
    cov_x, cov_y = np.cov(xs, rowvar=False), np.cov(ys, rowvar=False)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_x @ cov_y).real.clip(min=0)).sum()  # tr sqrtm(S_x S_y)
    expected = ((xs.mean(0) - ys.mean(0)) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_sqrt
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(x, x)) < 1e-6 < frechet_distance(x, y)


def test_dino_features_are_the_normalized_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    scorer = DinoScorer(str(tmp_path / "dino"), torch.device("cpu"))
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue")]
    features = scorer.image_features(images)
    assert features.shape == (2, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    pixels = (torch.tensor(np.asarray(images[0]), dtype=torch.float32).permute(2, 0, 1) / 255)[None]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        cls = scorer.model(pixel_values=pixels).last_hidden_state[0, 0]
    torch.testing.assert_close(features[0], torch.nn.functional.normalize(cls, dim=-1))
    with pytest.raises(SdpipeError, match="evaluate.dino_model"):
        DinoScorer(str(tmp_path / "missing"), torch.device("cpu"))


def test_one_model_per_stage_and_the_scoreboard_reads_the_rows(summary, project, tiny_sd_dir):
    """Re-scoring one model rewrites only its files; the scoreboard rebuilds the same rows from the files alone;
    prior_preservation is relative to the base's row."""
    params = eval_params(project, tiny_sd_dir)
    base_file = project / "eval" / "models" / "base" / "metrics.json"
    before = base_file.stat().st_mtime_ns
    again = evaluate_model(params, "textual_inversion", torch.device("cpu"))
    assert base_file.stat().st_mtime_ns == before
    assert again == {key: value for key, value in summary["textual_inversion"].items() if key not in SCOREBOARD_ADDS}
    assert summarize(params) == summary

    base = json.loads(base_file.read_text())
    base["joint_accuracy"] = 0.5  # a made-up base row: prior_preservation follows it
    rows = {"base": base, "textual_inversion": dict(again)}
    for name, metrics in rows.items():
        (project / "scoreboard" / "models" / name).mkdir(parents=True, exist_ok=True)
        (project / "scoreboard" / "models" / name / "metrics.json").write_text(json.dumps(metrics))
    scored = summarize(eval_params(project, tiny_sd_dir, eval_dir=project / "scoreboard"))
    assert scored["base"]["prior_preservation"] == 1.0
    assert scored["textual_inversion"]["prior_preservation"] == round(again["joint_accuracy"] / 0.5, 4)


def test_an_unknown_model_and_a_missing_row_are_refused(project, tiny_sd_dir, tmp_path):
    params = eval_params(project, tiny_sd_dir)
    with pytest.raises(SdpipeError, match=r"evaluate: no model 'lora'; expected base, a method of train.methods"):
        evaluate_model(params, "lora", torch.device("cpu"))
    with pytest.raises(SdpipeError, match=r"models/base/metrics.json: missing; run `dvc repro evaluate_base`"):
        summarize(eval_params(project, tiny_sd_dir, eval_dir=tmp_path))


def test_without_the_oracle_evaluate_imports_no_tiny_world_code(project, tiny_sd_dir, tmp_path):
    """A real-model user's evaluate (evaluate.oracle: false) scores with CLIP and the validation loss only, and
    never imports sdpipe.tinyworld (run in a fresh interpreter: this one has imported it for the fixtures)."""
    data = eval_params_data(project, tiny_sd_dir, eval_dir=tmp_path / "eval", oracle=False)
    (tmp_path / "params.json").write_text(json.dumps(data))
    code = (
        "import json, sys, torch\n"
        "from sdpipe.config import parse_params\n"
        "from sdpipe.evaluate import evaluate_models, write_summary\n"
        f"params = parse_params(json.load(open({str(tmp_path / 'params.json')!r})))\n"
        "rows = evaluate_models(params, torch.device('cpu'))\n"
        "write_summary(rows, __import__('pathlib').Path(params.paths.eval))\n"
        "print(json.dumps({'rows': rows, 'tinyworld': sorted(m for m in sys.modules if m.startswith('sdpipe.tinyworld'))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tinyworld"] == []
    rows = report["rows"]
    assert list(rows) == ["base", "textual_inversion"]
    for name, metrics in rows.items():
        assert set(metrics) == {"concept", "clip_t", "clip_i", "kid", "fid", "validation_loss", "images"}
        assert metrics["images"] == len(world.COLORS) * SEEDS  # the concept prompts only
        assert (tmp_path / "eval" / "grids" / name / f"{name}.png").is_file()
    assert "prior_preservation" not in (tmp_path / "eval" / "summary.md").read_text()
