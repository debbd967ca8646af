"""DreamArtist: the guided loss, a short run on the random tiny-world pipeline, its two embeddings and its sampling."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel

from sdpipe import sampling
from sdpipe.config import ParamsError, parse_params
from sdpipe.config.train import DreamArtistParams
from sdpipe.methods import dreamartist
from sdpipe.methods.dreamartist import DreamArtist
from sdpipe.training import CHECKPOINTS_DIR, MODEL_DIR
from sdpipe.training.checkpoints import list_checkpoints
from sdpipe.training.data import Batch
from sdpipe.training.loop import batch_loss, load_models

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run faster on one thread


def make_params(root, tiny_sd_dir, **settings):
    return parse_params(
        {
            "paths": {"latents": f"{root}/latents", "captions": f"{root}/captions", "train": f"{root}/train"},
            "base": {"base_model": str(tiny_sd_dir), "datasets": ["star"], "device": "cpu"},
            "train": {
                "methods": ["dreamartist"],
                "common": {"batch_size": 2, "checkpoint_every": 2, "sample_every": 0},
                "dreamartist": settings,
            },
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_dir, write_star_dataset):
    """A 3-step run, 2 positive and 3 negative vectors; returns (params, the stage's output folder)."""
    root = tmp_path_factory.mktemp("dreamartist")
    write_star_dataset(root)
    params = make_params(root, tiny_sd_dir, max_steps=STEPS, num_vectors=2, negative_num_vectors=3, learning_rate=0.05)
    out_dir = root / "train" / "dreamartist"
    dreamartist.train(params, out_dir)
    return params, out_dir


def setup_method(tiny_sd_dir, **settings):
    params = parse_params({"base": {"base_model": str(tiny_sd_dir), "device": "cpu"}})
    models = load_models(params.base, torch.device("cpu"))
    method = DreamArtist(DreamArtistParams(**settings), base_model=str(tiny_sd_dir))
    method.setup(models)
    return method, models


def test_negative_captions_name_the_negative_tokens():
    method = DreamArtist(DreamArtistParams(num_vectors=2, negative_num_vectors=2), base_model="unused")
    caption = method.caption("a small blue sks shape")
    assert caption == "a small blue <sks> <sks>_1 shape"
    assert method.negative_caption(caption) == "a small blue <sks>-neg <sks>-neg_1 shape"
    assert method.negative_caption("") == ""
    # the files are named after the token (`sks.safetensors`): one without a letter or digit is refused up front
    with pytest.raises(ParamsError, match=r"train\.dreamartist\.placeholder_token: .*'<>' has no letter or digit"):
        parse_params({"train": {"dreamartist": {"placeholder_token": "<>"}}})


def test_the_loss_is_the_guided_prediction_against_the_noise(tiny_sd_dir):
    method, models = setup_method(tiny_sd_dir, cfg_scale=3.0, negative_initializer_word="circle")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = [method.caption("a red sks shape"), method.caption("a blue sks shape")]
    common = parse_params({}).train.common.model_copy(update={"snr_gamma": None})
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    batch = Batch(latents=latents, captions=captions, keys=["star/0", "star/1"])
    loss, class_loss = batch_loss(
        method, models, batch, captions, None, torch.Generator().manual_seed(7), common, accelerator
    )
    assert class_loss is None

    # The same draws, then the guidance written out with two separate UNet calls.
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)

    def eps(texts):
        ids = models.tokenizer(texts, padding="max_length", max_length=models.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        return models.unet(noisy, timesteps, models.text_encoder(ids)[0]).sample

    negative_captions = ["a red <sks>-neg shape", "a blue <sks>-neg shape"]
    eps_pos, eps_neg = eps(captions), eps(negative_captions)
    assert not torch.allclose(eps_pos, eps_neg)
    expected = F.mse_loss(eps_neg + 3.0 * (eps_pos - eps_neg), noise)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, F.mse_loss(eps_pos, noise))


def test_the_reconstruction_loss_adds_the_l1_of_the_decoded_predicted_and_real_images(tiny_sd_dir):
    method, models = setup_method(tiny_sd_dir, cfg_scale=3.0, reconstruction_loss_weight=0.5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    captions = [method.caption("a red sks shape"), method.caption("a blue sks shape")]
    common = parse_params({}).train.common.model_copy(update={"snr_gamma": None})
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)
    batch = Batch(latents=latents, captions=captions, keys=["star/0", "star/1"])
    with torch.enable_grad():
        loss, _ = batch_loss(method, models, batch, captions, None, torch.Generator().manual_seed(7), common, accelerator)
        loss.backward()
    assert all(parameter.grad is not None for parameter in method.trainable_parameters())

    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (2,), generator=generator)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        guided = method.predict(models, noisy, timesteps, method.encode_text(models, captions))
        alphas = models.noise_scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        predicted = (noisy - (1 - alphas).sqrt() * guided) / alphas.sqrt()
        scale = method.vae.config.scaling_factor
        decoded, real = (method.vae.decode(x / scale).sample for x in (predicted, latents))
    expected = F.mse_loss(guided, noise) + 0.5 * F.l1_loss(decoded, real)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert not method.vae.decoder.conv_out.weight.requires_grad  # the VAE stays frozen


def test_the_reconstruction_loss_is_off_by_default(tiny_sd_dir):
    method, _ = setup_method(tiny_sd_dir)
    assert method.vae is None


def test_the_negative_rows_train_at_their_own_rate(tiny_sd_dir):
    method, models = setup_method(tiny_sd_dir, learning_rate=0.01, negative_learning_rate=0.0025)
    positive_id, negative_id = method.token_ids
    with torch.enable_grad():
        method.encode_text(models, [method.caption("a sks shape")])  # what a training step does first
    before = method.embeddings.detach().clone()
    with torch.no_grad():
        method.embeddings[[positive_id, negative_id]] += 1.0  # what the optimizer would do at the common rate
    method.after_optimizer_step(models)
    after = method.embeddings.detach()
    torch.testing.assert_close(after[positive_id], before[positive_id] + 1.0)
    torch.testing.assert_close(after[negative_id], before[negative_id] + 0.25)


def test_only_the_new_embedding_rows_change(trained, tiny_sd_dir):
    _, out_dir = trained
    base = CLIPTextModel.from_pretrained(tiny_sd_dir / "text_encoder").get_input_embeddings().weight.detach()
    [(_, checkpoint)] = list_checkpoints(out_dir / CHECKPOINTS_DIR)
    state = load_file(str(checkpoint / "model.safetensors"))
    [after] = [tensor for key, tensor in state.items() if key.endswith("token_embedding.weight")]
    assert after.shape == (len(base) + 5, base.shape[1])
    assert torch.equal(after[: len(base)], base)
    positive = load_file(str(out_dir / MODEL_DIR / "sks.safetensors"))["emb_params"]
    negative = load_file(str(out_dir / MODEL_DIR / "sks-neg.safetensors"))["emb_params"]
    assert positive.shape == (2, 64) and negative.shape == (3, 64)
    assert not torch.equal(after[len(base) : len(base) + 2], positive)  # step 2 (checkpoint) vs step 3 (output)
    assert not torch.equal(after[len(base) + 2 :], negative)


def test_the_model_folder_gives_a1111_and_comfyui_two_words(trained):
    """A1111 and ComfyUI load every embedding file of their `embeddings/` folder as the word of its name: one file
    per word, `sks` (the prompt) and `sks-neg` (the negative prompt)."""
    _, out_dir = trained
    files = [path for path in (out_dir / MODEL_DIR).rglob("*") if path.is_file()]
    assert sorted(path.name for path in files) == ["sks-neg.safetensors", "sks.safetensors"]
    words = [path.stem for path in files if path.suffix in (".pt", ".bin", ".safetensors")]
    assert sorted(words) == ["sks", "sks-neg"] and len(set(words)) == len(words)


def test_both_embeddings_load_in_diffusers_and_a1111(trained, tiny_sd_dir):
    _, out_dir = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    for stem, token, count in (("sks", "<sks>", 2), ("sks-neg", "<sks>-neg", 3)):
        path = out_dir / MODEL_DIR / f"{stem}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            assert list(f.keys()) == ["emb_params"]  # the layout A1111 and ComfyUI read from .safetensors
            learned = f.get_tensor("emb_params")
            metadata = f.metadata()
        assert learned.shape == (count, 64)
        assert metadata["placeholder_token"] == token and metadata["step"] == str(STEPS)
        pipe.load_textual_inversion(str(path), token=token)
        ids = pipe.tokenizer.convert_tokens_to_ids([token] + [f"{token}_{i}" for i in range(1, count)])
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach()[ids], learned)
    # The prompt `<sks>-neg` names the negative tokens only, not `<sks>`.
    negative = pipe.maybe_convert_prompt("a <sks>-neg shape", pipe.tokenizer)
    assert negative == "a <sks>-neg <sks>-neg_1 <sks>-neg_2 shape"
    assert not set(pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])) & set(pipe.tokenizer(negative).input_ids)


def test_sampling_uses_the_negative_embedding(trained):
    params, out_dir = trained
    pipeline, trigger = dreamartist.sampling_pipeline(params, out_dir / MODEL_DIR, torch.device("cpu"))
    assert trigger == "<sks>"
    pipeline.set_progress_bar_config(disable=True)
    seen = []
    encode_prompt = pipeline.encode_prompt

    def recording(prompt, device, images_per_prompt, guided, negative_prompt=None, **kwargs):
        seen.append(negative_prompt)
        return encode_prompt(prompt, device, images_per_prompt, guided, negative_prompt, **kwargs)

    pipeline.encode_prompt = recording
    guided = sampling.sample(pipeline, ["a red <sks> shape", "a red circle"], seeds=[0], steps=2)  # as evaluate samples
    assert seen == [["a red <sks>-neg shape", ""]]
    plain = pipeline(["a red <sks> shape"], num_inference_steps=2, height=32, width=32, negative_prompt=[""],
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert guided[0].tobytes() != plain.tobytes()  # the negative embedding changes the image
