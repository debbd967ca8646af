"""Full fine-tuning: a short run on the random tiny-world pipeline, its outputs loaded by diffusers (folder and single
file), the text encoder's own learning rate, and an interrupted run that resumes to the same weights (with EMA)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from sdpipe.config import parse_params
from sdpipe.methods import finetune
from sdpipe.methods.finetune import Finetune
from sdpipe.models.loading import load_pipeline
from sdpipe.training import CHECKPOINTS_DIR, MODEL_DIR, run_training
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.loop import load_models

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def finetune_params(root, base_model, **finetune_settings):
    settings = {
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "train_text_encoder": True,
        "text_encoder_learning_rate": 1e-4,
        **finetune_settings,
    }
    return parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train"},
            "base": {"base_model": str(base_model), "datasets": ["star"], "device": "cpu"},
            "train": {
                "methods": ["finetune"],
                "common": {"batch_size": 2, "checkpoint_every": 2, "sample_every": 0, "lr_warmup_steps": 1},
                "finetune": settings,
            },
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """A 4-step run with EMA (the default) and the text encoder training; keeps the method, whose parameters hold the
    weights it saved."""
    root = tmp_path_factory.mktemp("finetune")
    write_star_dataset(root)
    params = finetune_params(root, tiny_sd_dir)
    method = Finetune(params.train.finetune, params.base)
    out_dir = root / "train" / "finetune"
    run_training(params, method, out_dir)
    return SimpleNamespace(params=params, method=method, out_dir=out_dir, model_dir=out_dir / MODEL_DIR)


def state_dict(module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach() for key, tensor in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a), [key for key in a if not torch.equal(a[key], b[key])][:3]


def test_the_diffusers_folder_holds_the_trained_weights(trained, tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(
        trained.model_dir / "diffusers", safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    method = trained.method
    for name, parameters in (("unet", method.unet_parameters), ("text_encoder", method.text_encoder_parameters)):
        saved = list(getattr(pipe, name).parameters())
        assert len(saved) == len(parameters)
        assert all(torch.equal(s, p.detach()) for s, p in zip(saved, parameters)), name
        assert not torch.equal(saved[0], next(getattr(base, name).parameters())), f"{name} did not train"
    assert_same_weights(state_dict(pipe.vae), state_dict(base.vae))  # the base's VAE, untouched
    # EMA was on: the checkpoints hold the average beside the weights.
    assert all((path / "ema.safetensors").is_file() for _, path in list_checkpoints(trained.out_dir / CHECKPOINTS_DIR))


def test_the_single_file_loads_with_the_folder_as_config(trained):
    folder, single_file = trained.model_dir / "diffusers", trained.model_dir / "model.safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    # diffusers directly (the folder's image encoder has no place in a single file, so it is passed in)
    direct = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(folder), local_files_only=True, safety_checker=None, image_encoder=None
    )
    via_sdpipe = load_pipeline(str(single_file), str(folder))
    for loaded in (direct, via_sdpipe):
        for name in ("unet", "vae", "text_encoder"):
            assert_same_weights(state_dict(getattr(loaded, name)), state_dict(getattr(pipe, name)))
    with safe_open(str(single_file), framework="pt") as f:
        assert f.metadata()["sdpipe_method"] == "finetune" and f.metadata()["sdpipe_steps"] == str(STEPS)
    sampling, trigger = finetune.sampling_pipeline(trained.params, trained.model_dir, "cpu")
    assert trigger == "sks"
    assert_same_weights(state_dict(sampling.unet), state_dict(pipe.unet))


def test_what_trains_at_which_rate_and_the_caption_dropout(trained, tiny_sd_dir):
    params = trained.params
    models = load_models(params.base, torch.device("cpu"))
    method = Finetune(params.train.finetune, params.base)
    method.setup(models)
    unet_group, text_encoder_group = method.parameter_groups()
    assert "lr" not in unet_group  # the method's learning_rate
    assert text_encoder_group["lr"] == 1e-4
    assert len(text_encoder_group["params"]) == len(list(models.text_encoder.parameters()))
    assert method.trained_models == ("unet", "text_encoder") and method.ema_decay == 0.999
    # Its own caption dropout replaces train.common's (and only that): it trains the unconditional prediction.
    common_ops = params.train.common.caption_ops.model_copy(update={"caption_dropout": 0.3, "keep_tokens": 1})
    assert method.caption_ops(common_ops) == common_ops.model_copy(update={"caption_dropout": 0.1})
    no_own = Finetune(params.train.finetune.model_copy(update={"caption_dropout": None}), params.base)
    assert no_own.caption_ops(common_ops) == common_ops

    models = load_models(params.base, torch.device("cpu"))
    unet_only = Finetune(params.train.finetune.model_copy(update={"train_text_encoder": False}), params.base)
    unet_only.setup(models)
    assert unet_only.trained_models == ("unet",) and len(unet_only.parameter_groups()) == 1
    assert not any(p.requires_grad for p in models.text_encoder.parameters())


class Counted(Finetune):
    """Counts its optimizer steps, and stops like a killed process in the middle of step `stop_at`."""

    def __init__(self, *args, stop_at: int | None = None):
        super().__init__(*args)
        self.steps_run, self.stop_at = 0, stop_at

    def after_optimizer_step(self, models) -> None:
        self.steps_run += 1
        if self.steps_run == self.stop_at:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(trained, tmp_path):
    params, out_dir = trained.params, tmp_path / "finetune"
    with pytest.raises(KeyboardInterrupt):
        run_training(params, Counted(params.train.finetune, params.base, stop_at=3), out_dir)
    assert not (out_dir / MODEL_DIR).exists()
    assert [step for step, _ in list_checkpoints(out_dir / CHECKPOINTS_DIR)] == [2]

    resumed = Counted(params.train.finetune, params.base)
    run_training(params, resumed, out_dir)
    assert resumed.steps_run == STEPS - 2  # it went on from the step-2 checkpoint
    for file in (
        "model.safetensors",
        "diffusers/unet/diffusion_pytorch_model.safetensors",
        "diffusers/text_encoder/model.safetensors",
    ):
        assert (out_dir / MODEL_DIR / file).read_bytes() == (trained.model_dir / file).read_bytes(), file
