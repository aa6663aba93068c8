"""Initialising the spatial stage from a 2D image VAE (diffusers AutoencoderKL or LDM-style weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from cmvae.checkpoints import CheckpointError
from cmvae.inflate import inflate_from_image_vae
from cmvae.models.attention import TemporalAttention
from cmvae.models.resnet import TemporalConv

TOL = 1e-4


@pytest.fixture(scope="module")
def image_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)
    with torch.no_grad():  # move GroupNorm affines off their identity init so that they matter
        for module in vae.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return vae.eval()


def _pool_group_norm_over_batch(vae: nn.Module):
    """Make every GroupNorm of the 2D VAE treat its batch of frames as one clip (statistics pooled
    over all frames), the way GroupNorm behaves on a (1, C, T, H, W) tensor."""
    originals = []
    for module in vae.modules():
        if isinstance(module, nn.GroupNorm):
            def pooled(x, m=module):
                clip = x.transpose(0, 1).unsqueeze(0)  # (1, C, frames, ...)
                return F.group_norm(clip, m.num_groups, m.weight, m.bias, m.eps).squeeze(0).transpose(0, 1)
            originals.append((module, module.forward))
            module.forward = pooled
    return originals


def test_image_mode_equals_the_image_vae(image_vae):
    model = inflate_from_image_vae(image_vae, temporal_channels=32).eval()
    images = torch.rand(3, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        expected_latent = image_vae.encode(images).latent_dist.mode()
        latent = model.encode(images.unsqueeze(2)).latent_dist.mode()
        assert latent.shape == (3, 4, 1, 16, 12)
        assert (latent[:, :, 0] - expected_latent).abs().max() < TOL
        expected = image_vae.decode(expected_latent).sample
        decoded = model.decode(latent).sample[:, :, 0]
        assert (decoded - expected).abs().max() < TOL


def test_video_mode_adds_zero_and_pools_statistics_over_the_clip(image_vae):
    model = inflate_from_image_vae(image_vae, temporal_channels=32).eval()
    frames = torch.rand(8, 3, 16, 16) * 2 - 1
    frames = frames + torch.linspace(-0.5, 0.5, 8)[:, None, None, None]  # frames differ in brightness
    video = frames.transpose(0, 1).unsqueeze(0)  # (1, 3, 8, 16, 16)

    added = []

    def temporal_conv_hook(module, args, output):
        added.append(output.abs().max().item())

    def temporal_attention_hook(module, args, output):
        added.append((output - args[0]).abs().max().item())

    handles = [m.register_forward_hook(temporal_conv_hook) for m in model.modules() if isinstance(m, TemporalConv)]
    handles += [m.register_forward_hook(temporal_attention_hook)
                for m in model.modules() if isinstance(m, TemporalAttention)]
    with torch.no_grad():
        moments = model.encode_spatial(video).parameters[0].transpose(0, 1)
        z1 = moments[:, :4].transpose(0, 1).unsqueeze(0)
        decoded = model.decode_spatial(z1)[0].transpose(0, 1)
    for handle in handles:
        handle.remove()
    assert len(added) > 10 and max(added) == 0.0

    originals = _pool_group_norm_over_batch(image_vae)
    try:
        with torch.no_grad():
            h = image_vae.quant_conv(image_vae.encoder(frames))
            expected_decoded = image_vae.decode(h[:, :4]).sample
    finally:
        for module, forward in originals:
            module.forward = forward
    assert (moments - h).abs().max() < TOL
    assert (decoded - expected_decoded).abs().max() < TOL
    # and pooling matters: the per-frame image VAE gives something else on this clip
    with torch.no_grad():
        per_frame = image_vae.quant_conv(image_vae.encoder(frames))
    assert (per_frame - h).abs().max() > 1e-3


def test_ldm_checkpoint_with_first_stage_prefix(image_vae, tmp_path):
    from cmvae.inflate import ldm_names_from_diffusers

    state = {f"first_stage_model.{k}": v for k, v in ldm_names_from_diffusers(image_vae.state_dict()).items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state}, path)
    model = inflate_from_image_vae(path, temporal_channels=32).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = image_vae.encode(images).latent_dist.mode()
        assert (model.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0] - expected).abs().max() < TOL


def test_diffusers_folder_and_text_model(image_vae, tmp_path):
    image_vae.save_pretrained(tmp_path / "vae")
    model = inflate_from_image_vae(tmp_path / "vae", temporal_channels=32, context_dim=16,
                                   cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_patch_sizes=(1, 1)).eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    context = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = image_vae.encode(images).latent_dist.mode()
        got = model.encode(images.unsqueeze(2), context=context).latent_dist.mode()[:, :, 0]
    assert (got - expected).abs().max() < TOL  # cross-attention starts silent


def test_mismatched_config_is_refused(image_vae):
    with pytest.raises(CheckpointError, match="does not match"):
        inflate_from_image_vae(image_vae, config="tiny")
