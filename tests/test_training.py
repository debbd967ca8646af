"""The shared training core: the loss pieces, the batch stream, the NaN guard, checkpoint/resume and determinism.

Runs use a toy method that trains the UNet's `conv_in` (so the UNet-training path, with cached text encoder
outputs, is exercised) on fake latents and captions, with the random tiny-world pipeline.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from sdpipe.config import parse_params
from sdpipe.config.train import MethodParams, TrainCommon
from sdpipe.encode import save_safetensors
from sdpipe.errors import SdpipeError
from sdpipe.io import write_jsonl
from sdpipe.training import (
    CHECKPOINTS_DIR,
    LIVE_DIR,
    METRICS_FILE,
    MODEL_DIR,
    SAMPLES_DIR,
    TrainingMethod,
    checkpoints,
    run_training,
)
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.data import Batch, Example, LatentBatches
from sdpipe.training.diffusion import compute_snr, diffusion_loss, min_snr_weights, prediction_target
from sdpipe.training.loop import (
    LOSS_WINDOW,
    batch_loss,
    diffusion_losses,
    final_metrics,
    load_data,
    load_models,
    method_datasets,
    prepare_models,
    prepare_optimization,
    timestep_range,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


# --- fixtures: fake encode/caption outputs and a toy method -------------------------------------------------


def write_dataset(root: Path, name: str = "star", count: int = 6, flip: bool = True, shape=(4, 8, 8)) -> None:
    """What `encode` and `caption` would write for `count` images: latents (and flips) and captions."""
    generator = torch.Generator().manual_seed(len(name))
    latents, rows = {}, []
    for index in range(count):
        image_id = f"{name}_{index:02d}"
        latents[image_id] = torch.randn(shape, generator=generator)
        if flip:
            latents[f"{image_id}.flip"] = torch.flip(latents[image_id], dims=[-1])
        color = ("red", "blue", "green")[index % 3]
        caption = f"a {color} sks shape"
        rows.append({"id": image_id, "file": f"images/{image_id}.png", "caption": caption, "caption_source": "sidecar"})
    (root / "latents").mkdir(parents=True, exist_ok=True)
    save_safetensors(latents, root / "latents" / f"{name}.safetensors", {"scaling_factor": "0.18215"})
    write_jsonl(root / "captions" / f"{name}.jsonl", rows)


def make_params(root: Path, base_model: Path, common: dict | None = None, datasets=("star",)):
    common = {"batch_size": 2, "checkpoint_every": 0, "sample_every": 0, "lr_warmup_steps": 1, **(common or {})}
    return parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train"},
            "base": {"base_model": str(base_model), "datasets": list(datasets), "device": "cpu"},
            "train": {"common": common},
        }
    )


class ConvIn(TrainingMethod):
    """Trains the UNet's first convolution only: small, but every part of the core takes part."""

    name = "toy"
    trained_models = ("unet",)

    def setup(self, models) -> None:
        models.unet.conv_in.requires_grad_(True)
        self.conv_in = models.unet.conv_in

    def trainable_parameters(self):
        return list(self.conv_in.parameters())

    def save(self, models, folder: Path, step: int) -> None:
        state = {name: tensor.detach().contiguous() for name, tensor in models.unet.conv_in.state_dict().items()}
        save_safetensors(state, folder / "conv_in.safetensors", {"step": str(step)})


def toy(max_steps: int = 4, learning_rate: float = 1e-3) -> ConvIn:
    return ConvIn(MethodParams(max_steps=max_steps, learning_rate=learning_rate))


def output_files(out_dir: Path) -> dict[str, bytes]:
    """The outputs of a run (all but the checkpoints), by relative path."""
    paths = [out_dir / METRICS_FILE]
    for folder in (MODEL_DIR, SAMPLES_DIR, LIVE_DIR):
        paths += sorted((out_dir / folder).rglob("*"))
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in paths if path.is_file()}


# --- the loss pieces -------------------------------------------------------------------------------------------


def sd_scheduler(prediction: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction)


def hand_alpha_bar() -> np.ndarray:
    """SD's scaled-linear schedule, computed by hand in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return np.cumprod(1.0 - betas)


def test_min_snr_weights_match_a_hand_computation():
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alpha_bar = hand_alpha_bar()[timesteps.numpy()]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    computed_snr = compute_snr(sd_scheduler(), timesteps)
    np.testing.assert_allclose(computed_snr.numpy(), snr, rtol=1e-4)
    # High-SNR (early) timesteps are weighted down to gamma/SNR, low-SNR ones keep weight 1 (epsilon).
    expected_eps = np.minimum(snr, gamma) / snr
    expected_v = np.minimum(snr, gamma) / (snr + 1)
    np.testing.assert_allclose(min_snr_weights(computed_snr, gamma, "epsilon").numpy(), expected_eps, rtol=1e-4)
    np.testing.assert_allclose(min_snr_weights(computed_snr, gamma, "v_prediction").numpy(), expected_v, rtol=1e-4)
    assert expected_eps[0] < 0.01 and expected_eps[-1] == 1.0
    assert min_snr_weights(torch.tensor([0.0]), gamma, "epsilon").item() == 1.0  # zero-terminal-SNR limit


def test_min_snr_loss_is_the_weighted_mean_of_per_image_errors():
    scheduler = sd_scheduler()
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([5, 300, 900])
    alpha_bar = hand_alpha_bar()[timesteps.numpy()]
    snr = alpha_bar / (1 - alpha_bar)
    per_image = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).numpy()
    expected = (per_image * np.minimum(snr, 5.0) / snr).mean()
    assert diffusion_loss(prediction, target, timesteps, scheduler, 5.0).item() == pytest.approx(expected, rel=1e-4)
    plain = diffusion_loss(prediction, target, timesteps, scheduler, None).item()
    assert plain == pytest.approx(per_image.mean(), rel=1e-5)


def test_prediction_targets():
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 2, 2, generator=generator), torch.randn(2, 4, 2, 2, generator=generator)
    timesteps = torch.tensor([10, 700])
    assert torch.equal(prediction_target(sd_scheduler("epsilon"), latents, noise, timesteps), noise)
    assert torch.equal(prediction_target(sd_scheduler("sample"), latents, noise, timesteps), latents)
    alpha_bar = torch.tensor(hand_alpha_bar()[timesteps.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    target = prediction_target(sd_scheduler("v_prediction"), latents, noise, timesteps)
    torch.testing.assert_close(target, velocity, rtol=1e-4, atol=1e-5)


def test_the_timestep_range_must_fit_the_scheduler():
    assert timestep_range(TrainCommon(min_timestep=100, max_timestep=900), sd_scheduler()) == (100, 900)
    assert timestep_range(TrainCommon(), sd_scheduler()) == (0, 1000)
    with pytest.raises(SdpipeError, match=r"train\.common\.max_timestep \(2000\) is larger than .* \(1000\)"):
        timestep_range(TrainCommon(max_timestep=2000), sd_scheduler())


# --- the batch stream ------------------------------------------------------------------------------------------


def fake_examples(shapes: list[tuple], flip: bool = True) -> list[Example]:
    return [
        Example(
            key=f"d/{i}",
            latents=torch.full(shape, float(i)),
            flipped=torch.full(shape, -float(i)) if flip else None,  # the sign tells which was served
            caption=f"c{i}",
        )
        for i, shape in enumerate(shapes)
    ]


def test_each_epoch_visits_every_example_in_a_new_order_with_full_batches():
    examples = fake_examples([(4, 8, 8)] * 5)
    stream = LatentBatches(examples, batch_size=2, seed=0, flip=False)
    assert stream.batches_per_epoch == 3
    epochs = [[key for index in range(3 * e, 3 * e + 3) for key in stream.batch(index).keys] for e in range(3)]
    for keys in epochs:
        assert len(keys) == 6 and set(keys) == {f"d/{i}" for i in range(5)}  # the partial batch is filled up
    assert len({tuple(keys) for keys in epochs}) > 1
    again = LatentBatches(examples, batch_size=2, seed=0, flip=False)
    assert [again.batch(i).keys for i in range(9)] == [stream.batch(i).keys for i in range(9)]


def test_batches_keep_to_one_latent_shape_and_use_flips():
    examples = fake_examples([(4, 8, 8)] * 4 + [(4, 8, 4)] * 3)
    stream = LatentBatches(examples, batch_size=2, seed=3, flip=True)
    signs = set()
    for index in range(20):
        batch = stream.batch(index)
        assert batch.latents.shape[0] == 2  # stack succeeded: one shape per batch
        signs.update(torch.sign(batch.latents.flatten(1)[:, 0]).tolist())
    assert {-1.0, 1.0} <= signs  # both original and flipped latents were served
    no_flip = LatentBatches(examples, batch_size=2, seed=3, flip=False)
    assert all((no_flip.batch(i).latents >= 0).all() for i in range(20))


@pytest.mark.parametrize("class_size", [(8, 8), (8, 12)], ids=["one pass", "aspect buckets: two passes"])
def test_class_images_add_their_weighted_loss_whether_or_not_they_share_the_pass(tiny_sd_dir, class_size):
    models = load_models(SimpleNamespace(base_model=str(tiny_sd_dir), base_model_config=None), torch.device("cpu"))
    common = parse_params({}).train.common
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    data = torch.Generator().manual_seed(0)
    images = Batch(torch.randn(2, 4, 8, 8, generator=data), ["a red sks shape", "a blue sks shape"], ["a", "b"])
    class_latents = torch.randn(3, 4, *class_size, generator=data)
    class_images = Batch(class_latents, ["a circle", "a square", "a circle"], ["c", "d", "e"])

    loss, class_loss = batch_loss(
        toy(), models, images, images.captions, None, torch.Generator().manual_seed(7), common, accelerator,
        class_images, 0.5,
    )

    # each part on its own, drawing from the generator in the same order (its noise, then its timesteps)
    generator = torch.Generator().manual_seed(7)
    expected = [
        diffusion_losses(toy(), models, [part], None, generator, common, accelerator)[0]
        for part in (images, class_images)
    ]
    assert not torch.allclose(expected[0], expected[1])
    torch.testing.assert_close(class_loss, expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected[0] + 0.5 * expected[1], rtol=1e-5, atol=1e-6)


def test_method_datasets_must_be_prepared():
    assert method_datasets(["star", "outlined"], None, "train.x") == ["star", "outlined"]
    assert method_datasets(["star", "outlined"], ["star"], "train.x") == ["star"]
    with pytest.raises(SdpipeError, match=r"train\.x\.datasets lists dogs"):
        method_datasets(["star"], ["dogs"], "train.x")


# --- the phases of a run --------------------------------------------------------------------------------------


@pytest.mark.parametrize("processes", [1, 3])
def test_the_data_phase_serves_micro_batches_of_all_processes_and_names_its_files(tmp_path, tiny_sd_dir, processes):
    write_dataset(tmp_path, "star", count=6)
    write_dataset(tmp_path, "outlined", count=2)
    params = make_params(tmp_path, tiny_sd_dir, datasets=("star", "outlined"))
    data = load_data(params, toy(), processes)
    assert len(data.examples) == 8 and data.prior is None and data.class_batches is None
    assert len(data.batches.batch(0).keys) == 2 * processes  # batch_size images on each process
    assert sorted(path.name for path in data.input_files) == [
        "outlined.jsonl", "outlined.safetensors", "star.jsonl", "star.safetensors"
    ]


def test_the_model_phase_freezes_all_but_what_the_method_trains(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    params = make_params(tmp_path, tiny_sd_dir)
    method = toy()
    models = prepare_models(params, method, load_data(params, method, 1), torch.device("cpu"), torch.float32)
    trained = {name for name, parameter in models.unet.named_parameters() if parameter.requires_grad}
    assert trained == {"conv_in.weight", "conv_in.bias"}
    assert models.unet.training and not models.text_encoder.training
    assert not any(parameter.requires_grad for parameter in models.text_encoder.parameters())

    wrong = tmp_path / "wrong"
    write_dataset(wrong, shape=(3, 8, 8))
    wrong_params = make_params(wrong, tiny_sd_dir)
    with pytest.raises(SdpipeError, match="the latents have 3 channels but the UNet of base.base_model takes 4"):
        prepare_models(wrong_params, toy(), load_data(wrong_params, toy(), 1), torch.device("cpu"), torch.float32)


class NothingTrained(ConvIn):
    def trainable_parameters(self):
        return []


def test_the_optimization_phase_refuses_a_method_without_trainable_parameters(tmp_path, tiny_sd_dir):
    from accelerate import Accelerator

    write_dataset(tmp_path)
    params = make_params(tmp_path, tiny_sd_dir)
    method = NothingTrained(MethodParams(max_steps=2))
    models = prepare_models(params, method, load_data(params, method, 1), torch.device("cpu"), torch.float32)
    with pytest.raises(SdpipeError, match="train.toy: the method has no trainable parameters"):
        prepare_optimization(params, method, models, Accelerator(cpu=True))


def test_the_final_metrics_average_the_last_steps():
    data = SimpleNamespace(examples=[None] * 6, prior=None)
    losses = [100.0] * 10 + [float(step) for step in range(LOSS_WINDOW)]
    assert final_metrics(losses, 60, data) == {"loss": (LOSS_WINDOW - 1) / 2, "steps": 60, "images": 6}
    assert final_metrics([2.0, 4.0], 2, data)["loss"] == 3.0  # fewer steps than the window
    with_prior = SimpleNamespace(examples=[None] * 6, prior=SimpleNamespace(examples=[None] * 4))
    assert final_metrics([1.0], 1, with_prior)["class_images"] == 4


# --- whole runs ------------------------------------------------------------------------------------------------


def test_runs_are_bitwise_deterministic(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    params = make_params(tmp_path, tiny_sd_dir, {"sample_every": 2, "sample_steps": 2, "noise_offset": 0.05})
    first = run_training(params, toy(3), tmp_path / "a")
    second = run_training(params, toy(3), tmp_path / "b")
    assert first == second
    files_a, files_b = output_files(tmp_path / "a"), output_files(tmp_path / "b")
    expected = {"metrics.json", "model/conv_in.safetensors", "samples/step-000002.png", "samples/step-000003.png"}
    assert expected <= set(files_a)
    assert {"live/metrics.json", "live/plots/metrics/loss.tsv", "live/plots/metrics/lr.tsv"} <= set(files_a)
    assert files_a == files_b
    metrics = json.loads((tmp_path / "a" / METRICS_FILE).read_text())
    assert metrics["steps"] == 3 and metrics["images"] == 6 and metrics["loss"] > 0
    # Training changed the weights.
    base = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"]
    assert not torch.equal(load_file(str(tmp_path / "a" / MODEL_DIR / "conv_in.safetensors"))["weight"], base)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    common = {"checkpoint_every": 2, "keep_checkpoints": 2, "gradient_accumulation_steps": 2, "lr_scheduler": "cosine"}
    params = make_params(tmp_path, tiny_sd_dir, common)
    run_training(params, toy(4), tmp_path / "full")
    assert [step for step, _ in list_checkpoints(tmp_path / "full" / CHECKPOINTS_DIR)] == [2]  # none at the end

    # An "interrupted" run: only the step-2 checkpoint exists when it starts again.
    (tmp_path / "resumed" / CHECKPOINTS_DIR).mkdir(parents=True)
    checkpoint = Path(CHECKPOINTS_DIR) / "step-000002"
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "resumed" / checkpoint)
    # The checkpoint carries the metrics logged so far; mark step 1's row to see that it is restored, not rerun.
    saved_loss = tmp_path / "resumed" / checkpoint / "history" / "live" / "plots" / "metrics" / "loss.tsv"
    header, first, *rest = saved_loss.read_text().splitlines()
    saved_loss.write_text("\n".join([header, "1\t123.0", *rest]) + "\n")
    run_training(params, toy(4), tmp_path / "resumed")
    loss_rows = (tmp_path / "resumed" / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert [row.split("\t")[0] for row in loss_rows] == ["1", "2", "3", "4"]
    assert loss_rows[0] == "1\t123.0"  # it did resume: steps 1-2 were not run again
    full, resumed = output_files(tmp_path / "full"), output_files(tmp_path / "resumed")
    assert full["model/conv_in.safetensors"] == resumed["model/conv_in.safetensors"]
    assert full["metrics.json"] == resumed["metrics.json"]


def test_checkpoints_of_other_params_are_not_resumed(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    out = tmp_path / "out"
    run_training(make_params(tmp_path, tiny_sd_dir, {"checkpoint_every": 1, "keep_checkpoints": 2}), toy(4), out)
    assert [step for step, _ in list_checkpoints(out / CHECKPOINTS_DIR)] == [2, 3]  # the last 2
    changed = make_params(tmp_path, tiny_sd_dir, {"checkpoint_every": 0, "noise_offset": 0.1})
    run_training(changed, toy(4), out)
    loss_rows = (out / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert len(loss_rows) == 4  # it started over
    assert list_checkpoints(out / CHECKPOINTS_DIR) == []  # the stale checkpoint was deleted


def test_checkpoints_of_other_code_are_not_resumed(tmp_path, tiny_sd_dir, monkeypatch):
    write_dataset(tmp_path)
    out = tmp_path / "out"
    params = make_params(tmp_path, tiny_sd_dir, {"checkpoint_every": 2})
    run_training(params, toy(4), out)
    assert [step for step, _ in list_checkpoints(out / CHECKPOINTS_DIR)] == [2]
    package = tmp_path / "sdpipe"  # a copy of the package, then with one comment added to the training loop
    shutil.copytree(checkpoints.SDPIPE_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert checkpoints.code_fingerprint(package) == checkpoints.code_fingerprint()
    (package / "training" / "loop.py").write_text((package / "training" / "loop.py").read_text() + "# changed\n")
    other_code = checkpoints.code_fingerprint(package)
    assert other_code != checkpoints.code_fingerprint()

    monkeypatch.setattr(checkpoints, "code_fingerprint", lambda: other_code)
    run_training(params, toy(4), out)
    loss_rows = (out / "live" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[1:]
    assert len(loss_rows) == 4  # it started over


def test_divergence_stops_with_the_step_and_the_learning_rate_key_and_writes_no_model(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    common = {"max_grad_norm": None, "lr_scheduler": "constant", "checkpoint_every": 1}
    params = make_params(tmp_path, tiny_sd_dir, common)
    out = tmp_path / "out"
    # step 1's loss is finite; its update of 1e30 makes step 2's infinite
    with pytest.raises(SdpipeError, match=r"at step 2 of 5.*train\.toy\.learning_rate \(now 1e\+30\)"):
        run_training(params, toy(5, learning_rate=1e30), out)
    assert not (out / MODEL_DIR).exists() and not (out / METRICS_FILE).exists()
    assert [step for step, _ in list_checkpoints(out / CHECKPOINTS_DIR)] == [1]  # none of the diverged weights


def test_unknown_datasets_and_missing_latents_are_reported(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    rows = [{"id": "ghost", "file": "images/ghost.png", "caption": "a ghost", "caption_source": "sidecar"}]
    write_jsonl(tmp_path / "captions" / "star.jsonl", rows)
    with pytest.raises(SdpipeError, match=r"star\.jsonl: image 'ghost' has no latents"):
        run_training(make_params(tmp_path, tiny_sd_dir), toy(1), tmp_path / "out")


# --- EMA -------------------------------------------------------------------------------------------------------


class ConvInEma(ConvIn):
    """The toy method with an exponential moving average of its weights."""

    ema_decay = 0.9


def conv_in_weight(path: Path) -> torch.Tensor:
    """`conv_in.weight` from a method's saved file or from a checkpoint's model file."""
    state = load_file(str(path))
    return state["weight"] if "weight" in state else state["conv_in.weight"]


def test_the_saved_weights_are_the_moving_average_of_the_trained_ones(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    params = make_params(tmp_path, tiny_sd_dir, {"checkpoint_every": 1, "keep_checkpoints": 3})
    run_training(params, toy(3), tmp_path / "plain")
    checkpoints = [path for _, path in list_checkpoints(tmp_path / "plain" / CHECKPOINTS_DIR)]
    trained = [conv_in_weight(path / "model.safetensors") for path in checkpoints]  # after steps 1 and 2
    trained.append(conv_in_weight(tmp_path / "plain" / MODEL_DIR / "conv_in.safetensors"))  # after step 3

    run_training(params, ConvInEma(MethodParams(max_steps=3, learning_rate=1e-3)), tmp_path / "ema")
    saved = conv_in_weight(tmp_path / "ema" / MODEL_DIR / "conv_in.safetensors")

    # diffusers' EMAModel by hand: the first update copies, the n-th keeps min(0.9, n / (n + 9)) of the average.
    average = trained[0].clone()
    for n, weights in ((2, trained[1]), (3, trained[2])):
        decay = min(0.9, (1 + (n - 1)) / (10 + (n - 1)))
        average.sub_((1 - decay) * (average - weights))
    assert torch.equal(saved, average)
    assert not torch.equal(saved, trained[2])  # the average, not the last weights
    [(_, checkpoint)] = list_checkpoints(tmp_path / "ema" / CHECKPOINTS_DIR)[-1:]
    assert (checkpoint / "ema.safetensors").is_file()


def test_a_resumed_run_continues_the_moving_average(tmp_path, tiny_sd_dir):
    write_dataset(tmp_path)
    params = make_params(tmp_path, tiny_sd_dir, {"checkpoint_every": 2, "sample_every": 4, "sample_steps": 2})

    def ema_toy():
        return ConvInEma(MethodParams(max_steps=4, learning_rate=1e-3))

    run_training(params, ema_toy(), tmp_path / "full")
    (tmp_path / "resumed" / CHECKPOINTS_DIR).mkdir(parents=True)
    checkpoint = Path(CHECKPOINTS_DIR) / "step-000002"
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "resumed" / checkpoint)
    run_training(params, ema_toy(), tmp_path / "resumed")
    full, resumed = output_files(tmp_path / "full"), output_files(tmp_path / "resumed")
    assert full["model/conv_in.safetensors"] == resumed["model/conv_in.safetensors"]
    assert full["samples/step-000004.png"] == resumed["samples/step-000004.png"]  # samples (drawn with the average) too

    # A checkpoint without the average cannot resume a run that keeps one.
    (tmp_path / "resumed" / checkpoint / "ema.safetensors").unlink()
    shutil.rmtree(tmp_path / "resumed" / MODEL_DIR)
    with pytest.raises(SdpipeError, match=r"ema\.safetensors: the checkpoint has no EMA weights"):
        run_training(params, ema_toy(), tmp_path / "resumed")


def test_compiled_and_channels_last_unets_train_to_the_same_weights(tmp_path, tiny_sd_dir, monkeypatch):
    """`compile` and `channels_last` change how the UNet runs, not what it computes. The compile runs TorchDynamo and
    AOTAutograd as `compile: true` does, but without TorchInductor's C++ code generation (minutes on two cores):
    what is checked is that the training core works with a compiled UNet, not the compiler."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    write_dataset(tmp_path)
    plain = run_training(make_params(tmp_path, tiny_sd_dir), toy(2), tmp_path / "plain")
    fast = run_training(make_params(tmp_path, tiny_sd_dir, {"compile": True, "channels_last": True}), toy(2), tmp_path / "fast")
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    weights = [load_file(str(tmp_path / run / MODEL_DIR / "conv_in.safetensors"))["weight"] for run in ("plain", "fast")]
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-6)
    assert not torch.equal(weights[0], load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))["conv_in.weight"])
