"""Typed configuration of the Cross-modal Video VAE and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class CMVAEConfig:
    """Every width and switch of the network. The defaults are the released `16z` model."""

    in_channels: int = 3
    latent_channels: int = 16  # zc: 4 or 16 in the released models
    use_quant_conv: bool = False  # 1x1x1 convs around the spatial latent (the released 4z models)
    base_channels: int = 128  # ch
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)  # ch_mult; len - 1 = number of 2x downsamples
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    dropout: float = 0.0
    temporal_channels: int = 128  # hc, hidden width of the temporal autoencoder
    temporal_compression: int = 4  # a power of two; one stride-2 stage per factor of two
    max_relative_position: int = 64  # clamp of the temporal attention's relative positions
    context_dim: int | None = None  # text embedding width; None: no text cross-attention
    cross_attention_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_patch_sizes: tuple[int, ...] = (8, 4, 2, 1)  # per spatial level, level 0 first
    # The text encoder the cross-attention was trained with (`cmvae.text.load_text_encoder`: `t5`, `minilm`,
    # a hub name or a folder); used for captions, and for the empty caption when none is given.
    text_encoder_name: str | None = None
    # Per-channel statistics of the model's latents (as Wan's VAE keeps them): diffusion models train on
    # (z - mean) / std. Not part of the network; None where unmeasured.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self._check_types()
        # config.json stores lists; keep tuples so that configs compare and hash as values
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "cross_attention_patch_sizes", tuple(self.cross_attention_patch_sizes))
        for name in LATENT_STATISTICS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self._validate()

    def _check_types(self) -> None:
        """A config.json edited by hand can hold "16" for 16: say which field, not fail later."""
        problems = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            expected = _FIELD_TYPES[str(item.type)]
            if not _is_a(value, expected):
                problems.append(f"{item.name} must be {expected}, got {value!r}")
        if problems:
            raise ValueError("invalid CMVAEConfig: " + "; ".join(problems))

    def _validate(self) -> None:
        problems = []
        if self.latent_channels < 1 or self.in_channels < 1:
            problems.append("latent_channels and in_channels must be positive")
        if not self.channel_multipliers:
            problems.append("channel_multipliers must not be empty")
        widths = [self.base_channels * m for m in self.channel_multipliers]
        widths += [self.temporal_channels * 2**j for j in range(self.temporal_stages + 1)]
        if any(w % self.norm_num_groups for w in widths):
            problems.append(f"every width {sorted(set(widths))} must be a multiple of norm_num_groups={self.norm_num_groups}")
        if self.temporal_compression < 2 or self.temporal_compression & (self.temporal_compression - 1):
            problems.append(f"temporal_compression must be a power of two >= 2, got {self.temporal_compression}")
        if self.context_dim is not None:
            if len(self.cross_attention_patch_sizes) != len(self.channel_multipliers):
                problems.append("cross_attention_patch_sizes needs one entry per level of channel_multipliers")
            for level, p in enumerate(self.cross_attention_patch_sizes):
                if p < 1 or self.spatial_compression % (p * 2**level):
                    problems.append(f"patch size {p} at level {level} does not tile a frame of a multiple of "
                                    f"{self.spatial_compression} pixels")
        for name in LATENT_STATISTICS:
            values = getattr(self, name)
            if values is not None and len(values) != self.latent_channels:
                problems.append(f"{name} needs one value per latent channel ({self.latent_channels}), got {len(values)}")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            problems.append("latents_std must be positive")
        if problems:
            raise ValueError("invalid CMVAEConfig: " + "; ".join(problems))

    @property
    def has_text(self) -> bool:
        return self.context_dim is not None

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def temporal_stages(self) -> int:
        return max(self.temporal_compression.bit_length() - 1, 0)

    def replace(self, **changes) -> CMVAEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CMVAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown CMVAEConfig fields: {', '.join(unknown)}")
        return cls(**values)


_FIELD_TYPES = {"int": "an integer", "bool": "true or false", "float": "a number",
                "int | None": "an integer or null", "tuple[int, ...]": "a list of integers",
                "tuple[float, ...] | None": "a list of numbers or null", "str | None": "a string or null"}
LATENT_STATISTICS = ("latents_mean", "latents_std")
# Fields that do not change the network's computation (left out of a model's fingerprint).
NOT_NETWORK = LATENT_STATISTICS + ("text_encoder_name",)


def _is_a(value, expected: str) -> bool:
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if expected == "an integer":
        return integer(value)
    if expected == "true or false":
        return isinstance(value, bool)
    if expected == "a number":
        return integer(value) or isinstance(value, float)
    if expected == "an integer or null":
        return value is None or integer(value)
    if expected == "a string or null":
        return value is None or isinstance(value, str)
    if expected == "a list of numbers or null":
        return value is None or (isinstance(value, (list, tuple)) and all(integer(v) or isinstance(v, float)
                                                                          for v in value))
    return isinstance(value, (list, tuple)) and all(integer(v) for v in value)


_RELEASED = CMVAEConfig()
# Reduced models with the released structure (the reference data in ../shared/reference uses these).
_SMALL = CMVAEConfig(base_channels=32, channel_multipliers=(1, 2, 2, 2), temporal_channels=32)
_SMALL_TEXT = dict(cross_attention_heads=2, cross_attention_head_dim=16)
_T5 = "google/flan-t5-large"

PRESETS: dict[str, CMVAEConfig] = {
    "16z": _RELEASED,
    "16z-text": _RELEASED.replace(context_dim=1024, text_encoder_name=_T5),
    "4z": _RELEASED.replace(latent_channels=4, use_quant_conv=True),
    "4z-text": _RELEASED.replace(latent_channels=4, use_quant_conv=True, context_dim=1024, text_encoder_name=_T5),
    "small-16z": _SMALL,
    "small-16z-text": _SMALL.replace(context_dim=384, text_encoder_name="minilm", **_SMALL_TEXT),  # offline MiniLM
    "small-4z-text": _SMALL.replace(latent_channels=4, use_quant_conv=True, context_dim=64, **_SMALL_TEXT),
    # For fast tests and demos: one residual block a level (9M parameters).
    "tiny": _SMALL.replace(num_res_blocks=1),
    "tiny-text": _SMALL.replace(num_res_blocks=1, context_dim=384, text_encoder_name="minilm", **_SMALL_TEXT),
}


def preset(name: str) -> CMVAEConfig:
    """The configuration of a named preset (`16z`, `16z-text`, `4z`, `4z-text`, `small-16z`, ...)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
