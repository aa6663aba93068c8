"""The model's Python API: shapes, modes, posteriors, input checks, training helpers."""

from __future__ import annotations

import pytest
import torch

from cmvae import CMVAEConfig, CrossModalVAE, preset


@pytest.fixture
def model() -> CrossModalVAE:
    torch.manual_seed(0)
    return CrossModalVAE.from_preset("tiny").eval()


def _randomise_temporal_layers(model: CrossModalVAE) -> None:
    """A fresh model's temporal layers are zero; give them weights so that they matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_tmp." in name and p.ndim > 1:
                p.normal_(0, 0.02)


def test_shapes_of_video_and_image(model):
    video = torch.rand(2, 3, 8, 32, 24) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(video).latent_dist
        assert posterior.mode().shape == (2, 16, 2, 4, 3)
        assert model.decode(posterior.mode()).sample.shape == video.shape
        image = video[:, :, :1]
        latent = model.encode(image).latent_dist.mode()
        assert latent.shape == (2, 16, 1, 4, 3)
        assert model.decode(latent).sample.shape == image.shape


def test_four_frame_video_needs_image_mode_false_to_decode(model):
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = model.encode(video).latent_dist.mode()
        assert latent.shape[2] == 1
        assert model.decode(latent, image_mode=False).sample.shape == video.shape
        assert model.decode(latent).sample.shape[2] == 1  # taken for an image by default


def test_stages_compose_to_the_full_model(model):
    _randomise_temporal_layers(model)
    video = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        spatial = model.encode_spatial(video)
        temporal = model.encode_temporal(spatial.mode())
        assert torch.equal(temporal.mode(), model.encode(video).latent_dist.mode())
        z1 = model.decode_temporal(temporal.mode())
        assert z1.shape == spatial.mode().shape
        assert torch.equal(model.decode_spatial(z1), model.decode(temporal.mode()).sample)
        out = model(video)
        assert torch.equal(out.sample, model.decode(temporal.mode()).sample)


def test_image_mode_encodes_every_frame_alone(model):
    _randomise_temporal_layers(model)
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        folded = model.encode_spatial(video, image_mode=True).mode()
        for t in range(4):
            alone = model.encode(video[:, :, t:t + 1]).latent_dist.mode()
            assert torch.allclose(folded[:, :, t:t + 1], alone, atol=1e-5)


def test_fresh_model_on_a_static_clip_equals_image_mode():
    model = CrossModalVAE.from_preset("tiny").eval()
    frame = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    clip = frame.expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        video_moments = model.encode_spatial(clip).parameters
        image_moments = model.encode_spatial(frame, image_mode=True).parameters
    assert torch.allclose(video_moments, image_moments.expand_as(video_moments), atol=1e-5)


def test_posterior_sampling_and_kl(model):
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(video).latent_dist
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    c = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    mean, logvar = posterior.parameters.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert posterior.kl().shape == (1,)
    assert torch.allclose(posterior.kl(), expected)


def test_forward_samples_both_posteriors_when_asked(model):
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad():
        deterministic = model(video).sample
        sampled = model(video, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(deterministic, sampled.sample)
    assert sampled.latent_dist.mean.shape[2] == 1 and sampled.spatial_dist.mean.shape[2] == 4


@pytest.mark.parametrize("shape, message", [
    ((3, 4, 16, 16), "unsqueeze"),
    ((1, 4, 4, 16, 16), "channels"),
    ((1, 3, 6, 16, 16), "multiple of 4 frames"),
    ((1, 3, 4, 20, 16), "multiples of 8"),
])
def test_wrong_input_says_what_to_do(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model.encode(torch.zeros(shape))


def test_wrong_latent_is_refused(model):
    with pytest.raises(ValueError, match="latent of shape"):
        model.decode(torch.zeros(1, 4, 1, 2, 2))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = CrossModalVAE.from_preset("tiny")
    _randomise_temporal_layers(model)
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1

    def gradients():
        model.zero_grad()
        model(video).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.enable_gradient_checkpointing()
    checkpointed = gradients()
    model.disable_gradient_checkpointing()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_bfloat16_autocast_runs_finite(model):
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(video).sample
        reference = model(video).sample
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_config_validation():
    with pytest.raises(ValueError, match="norm_num_groups"):
        CMVAEConfig(base_channels=20)
    with pytest.raises(ValueError, match="power of two"):
        CMVAEConfig(temporal_compression=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")
    assert CMVAEConfig.from_dict(preset("4z-text").to_dict()) == preset("4z-text")


def test_latent_statistics_live_in_the_config_and_normalise_per_channel(tmp_path):
    from cmvae.pipeline import model_fingerprint

    mean, std = [0.5 * c for c in range(16)], [1.0 + c for c in range(16)]
    model = CrossModalVAE.from_preset("tiny", latents_mean=mean, latents_std=std)
    z = torch.randn(2, 16, 3, 4, 5)
    normalised = model.normalize_latents(z)
    torch.testing.assert_close(normalised[:, 3], (z[:, 3] - 1.5) / 4.0)
    torch.testing.assert_close(model.denormalize_latents(normalised), z)
    model.save_pretrained(tmp_path / "m")
    assert CrossModalVAE.from_pretrained(tmp_path / "m").cfg.latents_std == tuple(std)
    plain = CrossModalVAE.from_preset("tiny")
    plain.load_state_dict(model.state_dict())
    assert model_fingerprint(plain) == model_fingerprint(model)  # statistics do not change what decodes a latent
    with pytest.raises(ValueError, match="latents_mean"):
        plain.normalize_latents(z)
    with pytest.raises(ValueError, match="one value per latent channel"):
        CMVAEConfig(latents_mean=[0.0] * 3, latents_std=[1.0] * 3)
    with pytest.raises(ValueError, match="positive"):
        preset("tiny").replace(latents_mean=[0.0] * 16, latents_std=[0.0] * 16)
