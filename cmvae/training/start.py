"""The model a run starts from (fresh, inflated from an image VAE, or pretrained weights) and which of its
parameters train."""

from __future__ import annotations

import re

from torch import nn

from pathlib import Path

from ..checkpoints import DEFAULT_MODEL_DIR, load_model
from ..inflate import inflate_from_image_vae
from ..models import CMVAEConfig, CrossModalVAE, preset
from .config import ConfigError, ModelConfig

# Named groups of parameters for `model.trainable`; anything else is read as a regular expression.
PARAMETER_GROUPS = {
    "all": r".",
    "temporal": r"_tmp\.|^encoder_temporal\.|^decoder_temporal\.",  # temporal layers + temporal autoencoder
    "temporal-layers": r"_tmp\.",
    "temporal-autoencoder": r"^encoder_temporal\.|^decoder_temporal\.",
    "spatial": r"^(encoder|decoder|quant_conv|post_quant_conv)\.",
    "encoder": r"^(encoder|encoder_temporal|quant_conv)\.",
    "decoder": r"^(decoder|decoder_temporal|post_quant_conv)\.",
    "cross-attention": r"attn\d?\.\d+\.",
}
# Parameters that image batches (image mode) never use.
VIDEO_ONLY = re.compile(PARAMETER_GROUPS["temporal"])


def architecture(config: ModelConfig) -> CMVAEConfig | None:
    """The configured architecture: the preset with `model.config` changes, or None (read off the weights)."""
    if config.preset is None and not config.config:
        return None
    try:
        base = preset(config.preset).to_dict() if config.preset else {}
        return CMVAEConfig.from_dict({**base, **config.config})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.preset/model.config: {error}") from None


def resolve_weights(weights: str) -> Path:
    """`model.weights` as a path: `default` is the shipped model's folder."""
    return DEFAULT_MODEL_DIR if weights == "default" else Path(weights)


def build_model(config: ModelConfig) -> CrossModalVAE:
    """The starting model in float32 and training mode."""
    cfg = architecture(config)
    if config.init == "scratch":
        model = CrossModalVAE.from_cmvae_config(cfg)
    elif config.init == "inflate":
        model = inflate_from_image_vae(config.weights, config=cfg)
    else:
        if not config.weights:
            raise ConfigError("model.init=pretrained needs model.weights: a model folder, a weights file or default")
        model = load_model(resolve_weights(config.weights), config=cfg)
    return model.float().train()


def select_trainable(model: nn.Module, groups: list[str]) -> list[str]:
    """Switch off gradients of every parameter outside `groups`; return the names that train."""
    patterns = []
    for group in groups:
        pattern = PARAMETER_GROUPS.get(group, group)
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"model.trainable: {group!r} is neither a group ({', '.join(PARAMETER_GROUPS)}) "
                              f"nor a regular expression ({error})") from None
        if not any(compiled.search(name) for name, _ in model.named_parameters()):
            raise ConfigError(f"model.trainable: {group!r} matches no parameter of this model "
                              f"(groups: {', '.join(PARAMETER_GROUPS)})")
        patterns.append(compiled)
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p.search(name) for p in patterns))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable
