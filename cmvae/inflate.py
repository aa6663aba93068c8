"""Initialise the spatial stage from a 2D Stable Diffusion-style image VAE, as the paper does.

Each 2D kernel `(kh, kw)` becomes a `(1, kh, kw)` kernel; every temporal layer keeps its zero
initialisation, so the inflated model in image mode is the image VAE, and on a video it is the image
VAE with GroupNorm statistics pooled over the clip. The temporal autoencoder starts fresh.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, ConfigLike, read_state_dict, resolve_config
from .models import CMVAEConfig, CrossModalVAE

_DIFFUSERS_RENAMES = [
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.(?:group_norm)\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.(?:to_q|query)\.", ".mid.attn_1.q."),
    (r"\.mid_block\.attentions\.0\.(?:to_k|key)\.", ".mid.attn_1.k."),
    (r"\.mid_block\.attentions\.0\.(?:to_v|value)\.", ".mid.attn_1.v."),
    (r"\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", ".mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
# Parameters that an image VAE does not have: they keep the fresh model's initialisation.
_NEW_IN_VIDEO = re.compile(r"(_tmp\.|^encoder_temporal\.|^decoder_temporal\.|\.attn\.\d+\.)")


def ldm_names_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to the LDM names the released model uses."""
    levels = len({m.group(1) for k in state if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))})
    renamed = {}
    for key, tensor in state.items():
        # diffusers numbers decoder blocks in the order they run; LDM numbers them by resolution level
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", key)
        for pattern, replacement in _DIFFUSERS_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    return renamed


def read_image_vae(source) -> dict[str, torch.Tensor]:
    """The 2D VAE's weights under LDM names, from a diffusers `AutoencoderKL` (object or folder) or an
    LDM-style weights file (a Stable Diffusion checkpoint with `first_stage_model.` keys, or a bare VAE)."""
    if isinstance(source, nn.Module):
        return ldm_names_from_diffusers(source.state_dict())
    path = Path(source)
    if path.is_dir():
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load a diffusers AutoencoderKL from {path}: {error}") from None
        return ldm_names_from_diffusers(vae.state_dict())
    state = read_state_dict(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(".down_blocks." in k or ".mid_block." in k for k in state):
        state = ldm_names_from_diffusers(state)
    return state


def config_of_image_vae(state: dict[str, torch.Tensor], **changes) -> CMVAEConfig:
    """A video configuration whose spatial stage matches the image VAE's widths."""
    try:
        base = state["encoder.conv_in.weight"].shape[0]
        levels = len({m.group(1) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
        multipliers = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in range(levels))
        blocks = len({m.group(1) for k in state if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
        values = dict(in_channels=state["encoder.conv_in.weight"].shape[1],
                      latent_channels=state["decoder.conv_in.weight"].shape[1],
                      use_quant_conv="quant_conv.weight" in state, base_channels=base,
                      channel_multipliers=multipliers, num_res_blocks=blocks)
    except KeyError as error:
        raise CheckpointError(f"not an image VAE state dict: no key {error.args[0]!r}") from None
    return CMVAEConfig(**{**values, **changes})


def inflate_from_image_vae(source, config: ConfigLike = None, **changes) -> CrossModalVAE:
    """A video model whose spatial stage is the given image VAE, inflated.

    `source` is a diffusers `AutoencoderKL`, its folder, or an LDM-style weights file. Without a
    `config`, the spatial widths are read off the image VAE and the rest (temporal width, text) comes
    from `changes` or the defaults.
    """
    state = read_image_vae(source)
    cfg = resolve_config(config) or config_of_image_vae(state, **changes)
    model = CrossModalVAE.from_cmvae_config(cfg)
    own = model.state_dict()
    wanted = {k for k in own if not _NEW_IN_VIDEO.search(k)}
    missing = sorted(wanted - set(state))
    unexpected = sorted(set(state) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"the image VAE does not match this configuration; missing: {missing[:8]}, "
                              f"unexpected: {unexpected[:8]}")
    inflated = {}
    for key in sorted(wanted):
        tensor = _inflate(state[key].to(own[key].dtype), own[key].ndim)
        if tensor.shape != own[key].shape:
            raise CheckpointError(f"{key}: image VAE has shape {tuple(state[key].shape)}, model needs "
                                  f"{tuple(own[key].shape)}")
        inflated[key] = tensor
    model.load_state_dict(inflated, strict=False)
    _silence_cross_attention(model)
    return model


def _inflate(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """A 2D conv kernel (o, i, kh, kw) -> (o, i, 1, kh, kw); a linear (o, i) -> a pointwise (o, i, 1, 1, 1)."""
    if ndim == 5 and tensor.ndim == 4:
        return tensor.unsqueeze(2)
    if ndim == 5 and tensor.ndim == 2:
        return tensor[:, :, None, None, None]
    return tensor


def _silence_cross_attention(model: CrossModalVAE) -> None:
    """Zero the output of every cross-attention so that text starts as a no-op on the image VAE."""
    for name, parameter in model.named_parameters():
        if re.search(r"attn\d?\.\d+\.to_out\.", name):
            nn.init.zeros_(parameter)

