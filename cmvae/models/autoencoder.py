"""The Cross-modal Video VAE: spatial stage, temporal stage, and the encode/decode API."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .attention import TextContext
from .config import CMVAEConfig, preset
from .distributions import DiagonalGaussian
from .groupnorm import row_statistics
from .layers import Conv3d
from .spatial import LocalMap, SpatialDecoder, SpatialEncoder
from .temporal import TemporalDecoder, TemporalEncoder

Captions = str | Sequence[str | None] | None


class CaptionEncoder(Protocol):
    """What the model needs of a text encoder (see `cmvae.text`)."""

    dim: int

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class CMVAEOutput(BaseOutput):
    """Output of a full pass: the reconstruction and both posteriors.

    `latent_dist` is the final posterior (temporal in video mode, spatial in image mode);
    the KL term of training uses it alone.
    """

    sample: torch.Tensor
    latent_dist: DiagonalGaussian
    spatial_dist: DiagonalGaussian


def _fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, 1, H, W): every frame becomes its own image."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, 1, h, w)


def _unfold_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    n, c, _, h, w = x.shape
    return x.reshape(batch, n // batch, c, h, w).transpose(1, 2)


# The file a saved model folder carries so that `diffusers.AutoModel.from_pretrained(folder,
# trust_remote_code=True)` finds this class: it only imports it from the installed cmvae.
REMOTE_CODE = '''"""Lets `diffusers.AutoModel.from_pretrained(this_folder, trust_remote_code=True)` load this model.

The code is the installed cmvae package (pip install cmvae); this file only names its class.
"""

from cmvae.models.autoencoder import CrossModalVAE  # noqa: F401
'''


class CrossModalVAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    """Cross-modal Video VAE (Xing et al., arXiv 2412.17805), with the released parameter names.

    Videos `(B, 3, T, H, W)` in [-1, 1] with `T` a multiple of 4 encode to `(B, zc, T/4, H/8, W/8)`;
    an image (`T == 1`) runs in image mode (no temporal layers, no temporal stage) and encodes to
    `(B, zc, 1, H/8, W/8)`. The keyword arguments are the fields of `CMVAEConfig`.

    diffusers' conventions: `enable_tiling` / `enable_slicing` (and `enable_temporal_chunking`, this
    model's own) change how `encode` and `decode` run, not their signature; `spatial_compression_ratio`
    and `temporal_compression_ratio`; `normalize_latents` / `denormalize_latents` with the config's
    `latents_mean` / `latents_std`.
    """

    _supports_gradient_checkpointing = True
    remote_code_file = f"{__module__.rsplit('.', 1)[-1]}.py"  # the module `auto_map` in config.json names

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        use_quant_conv: bool = False,
        base_channels: int = 128,
        channel_multipliers: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        temporal_channels: int = 128,
        temporal_compression: int = 4,
        max_relative_position: int = 64,
        context_dim: int | None = None,
        cross_attention_heads: int = 8,
        cross_attention_head_dim: int = 64,
        cross_attention_patch_sizes: tuple[int, ...] = (8, 4, 2, 1),
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        text_encoder_name: str | None = None,
    ):
        super().__init__()
        cfg = CMVAEConfig(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.cfg = cfg
        self.encoder = SpatialEncoder(cfg)
        self.decoder = SpatialDecoder(cfg)
        self.encoder_temporal = TemporalEncoder(cfg)
        self.decoder_temporal = TemporalDecoder(cfg)
        zc = cfg.latent_channels
        self.quant_conv = Conv3d(2 * zc, 2 * zc, 1) if use_quant_conv else None
        self.post_quant_conv = Conv3d(zc, zc, 1) if use_quant_conv else None
        self._text_encoder: list[CaptionEncoder] = []  # a list keeps it out of state_dict and .to()
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = 256  # pixels; tiles of the frame when tiling without a memory budget
        self.tile_overlap = 64
        self.tiling_max_memory: int | str | None = None
        self.temporal_chunk: tuple[int, int] | None = None  # (frames, overlap) when chunking is on

    @property
    def spatial_compression_ratio(self) -> int:
        return self.cfg.spatial_compression

    @property
    def temporal_compression_ratio(self) -> int:
        return self.cfg.temporal_compression

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """diffusers' `save_pretrained`, plus the small module that lets `AutoModel` load the folder."""
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            (Path(save_directory) / self.remote_code_file).write_text(REMOTE_CODE, encoding="utf-8")
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # `auto_map` is for diffusers' AutoModel, not an argument of this class
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    # ---- diffusers' switches: how encode and decode run ---------------------------------------

    def enable_tiling(self, max_memory: int | str | None = None, tile_sample_min_size: int | None = None,
                      tile_overlap: int | None = None) -> None:
        """Run the spatial levels of `encode` and `decode` on bounded memory, exactly (the output equals the
        untiled output up to rounding: tiles share the whole frame's GroupNorm statistics).

        Without `max_memory`: every level in overlapping tiles of `tile_sample_min_size` pixels (256).
        With `max_memory` (bytes or a size such as "4GB", for the whole process): each level whole where it
        fits, else in bands of rows, else in tiles, as `cmvae reconstruct --max-memory` does.
        """
        from ..memory import parse_size
        from ..tiling import TileSettings

        max_memory = None if max_memory is None else parse_size(max_memory)
        tiles = TileSettings(tile_sample_min_size or self.tile_sample_min_size,
                             self.tile_overlap if tile_overlap is None else tile_overlap)  # validates
        self.tiling_max_memory, self.tile_sample_min_size, self.tile_overlap = max_memory, tiles.tile, tiles.overlap
        self.use_tiling = True

    def enable_temporal_chunking(self, chunk_frames: int = 16, overlap: int = 4) -> None:
        """Encode and decode long videos in overlapping chunks of `chunk_frames` frames (multiples of 4),
        cross-faded over `overlap` frames: memory bounded by the chunk, not the video. Approximate: the
        temporal layers see one chunk at a time, so the output differs from the whole video's."""
        from ..chunking import ChunkSettings

        ChunkSettings(chunk_frames, overlap)  # validates
        self.temporal_chunk = (chunk_frames, overlap)

    def disable_temporal_chunking(self) -> None:
        self.temporal_chunk = None

    def _tiling_map(self) -> LocalMap | None:
        if not self.use_tiling:
            return None
        from ..local_maps import levels_within, tiled_levels
        from ..tiling import TileSettings

        if self.tiling_max_memory is not None:
            return levels_within(self, self.tiling_max_memory, self.device)
        return tiled_levels(self, TileSettings(self.tile_sample_min_size, self.tile_overlap, "exact"))

    def _per_sample(self, fn: Callable, x: torch.Tensor, text: TextContext | None) -> torch.Tensor:
        """`fn(x, text)`, or with slicing on, one sample of the batch at a time (as diffusers slices)."""
        if not self.use_slicing or x.shape[0] == 1:
            return fn(x, text)
        rows = [None if text is None else TextContext(text.embeddings[i:i + 1], text.mask[i:i + 1])
                for i in range(x.shape[0])]
        return torch.cat([fn(x[i:i + 1], row) for i, row in enumerate(rows)])

    def _over_time(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps_per_frame: int
                   ) -> torch.Tensor:
        """`fn(x)`, or with temporal chunking on, over overlapping windows of `x`'s time axis, cross-faded."""
        if self.temporal_chunk is None:
            return fn(x)
        from ..chunking import windowed_map

        frames, overlap = (n // steps_per_frame for n in self.temporal_chunk)
        return torch.cat(list(windowed_map(x.split(frames, dim=2), fn, frames, overlap)), dim=2)

    def _bounded(self):
        """The pipeline's exact GroupNorm arithmetic while tiling (bands and tiles rely on it)."""
        return row_statistics() if self.use_tiling else contextlib.nullcontext()

    def to(self, *args, **kwargs) -> CrossModalVAE:
        # ModelMixin.to warns on every dtype cast (about fp32-kept modules, of which this model has
        # none: its normalisations compute in float32 whatever the weights' dtype).
        return nn.Module.to(self, *args, **kwargs)

    @classmethod
    def from_cmvae_config(cls, cfg: CMVAEConfig) -> CrossModalVAE:
        return cls(**cfg.to_dict())

    @classmethod
    def from_preset(cls, name: str, **changes) -> CrossModalVAE:
        """A freshly initialised model of a named preset (`16z`, `4z-text`, `small-16z`, `tiny`, ...)."""
        return cls.from_cmvae_config(preset(name).replace(**changes))

    # ---- text ---------------------------------------------------------------------------------

    @property
    def text_encoder(self) -> CaptionEncoder | None:
        return self._text_encoder[0] if self._text_encoder else None

    def set_text_encoder(self, encoder: CaptionEncoder | None) -> None:
        """Attach the encoder that turns `captions=` into embeddings (not saved with the model)."""
        if encoder is not None and self.cfg.has_text and encoder.dim != self.cfg.context_dim:
            raise ValueError(f"text encoder gives {encoder.dim}-wide embeddings, but this model's cross-attention "
                             f"expects context_dim={self.cfg.context_dim}")
        self._text_encoder = [] if encoder is None else [encoder]

    def text_context(
        self,
        batch: int,
        captions: Captions = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> TextContext | None:
        """Resolve captions or precomputed embeddings into one `TextContext` row per sample.

        A text model given neither uses the empty caption (as diffusers pipelines call `decode(z)`),
        embedded by the attached text encoder or, if none is attached, the one `text_encoder_name` names.
        """
        if not self.cfg.has_text:
            if captions is not None or context is not None:
                raise ValueError("this model has no text cross-attention (context_dim is None): "
                                 "do not pass captions or context")
            return None
        if context is None:
            context, context_mask = self._embed_captions(batch, captions)
        elif captions is not None:
            raise ValueError("pass either captions or context, not both")
        return self._check_context(batch, context, context_mask)

    def _embed_captions(self, batch: int, captions: Captions) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None and self.cfg.text_encoder_name is not None:
            from ..text import load_text_encoder  # the encoder the config names, on first use

            self.set_text_encoder(load_text_encoder(self.cfg.text_encoder_name))
        if self.text_encoder is None:
            raise ValueError(
                "this model is text-conditioned: pass context= (caption embeddings of shape "
                f"(B, L, {self.cfg.context_dim})) with context_mask=, or attach a text encoder with "
                "model.set_text_encoder(...) (see cmvae.text) and pass captions="
            )
        if captions is None or isinstance(captions, str):
            captions = [captions or ""] * batch
        captions = ["" if c is None else c for c in captions]  # a missing caption is the empty string
        if len(captions) != batch:
            raise ValueError(f"got {len(captions)} captions for a batch of {batch}")
        return self.text_encoder(captions)

    def _check_context(self, batch: int, context: torch.Tensor, mask: torch.Tensor | None) -> TextContext:
        if context.ndim != 3 or context.shape[-1] != self.cfg.context_dim or context.shape[0] not in (1, batch):
            raise ValueError(f"context must have shape ({batch}, L, {self.cfg.context_dim}), got {tuple(context.shape)}")
        if mask is None:
            mask = torch.ones(context.shape[:2])
        if tuple(mask.shape) != tuple(context.shape[:2]):
            raise ValueError(f"context_mask must have shape {tuple(context.shape[:2])}, got {tuple(mask.shape)}")
        context = context.to(self.device).expand(batch, -1, -1)
        mask = mask.to(self.device).expand(batch, -1)
        return TextContext(context, mask)

    # ---- the two stages, callable on their own ------------------------------------------------

    def encode_spatial(self, x: torch.Tensor, text: TextContext | None = None, image_mode: bool = False,
                       local_map: LocalMap | None = None) -> DiagonalGaussian:
        """Frames (B, 3, T, H, W) -> spatial posterior over (B, zc, T, H/8, W/8) (after `quant_conv`).

        In image mode every frame is encoded alone, with no temporal layer. `local_map` runs each
        level (see `encode`).
        """
        if image_mode:
            batch, frames = x.shape[0], x.shape[2]
            text = None if text is None else text.repeat_frames(frames)
            moments = _unfold_frames(self._spatial_moments(_fold_frames(x), text, False, local_map), batch)
        else:
            moments = self._spatial_moments(x, text, True, local_map)
        return DiagonalGaussian(moments)

    def _spatial_moments(self, x: torch.Tensor, text: TextContext | None, video: bool,
                         local_map: LocalMap | None = None) -> torch.Tensor:
        moments = self.encoder(x, text, video, local_map)  # the module call: FSDP gathers weights in its hooks
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode_spatial(self, z1: torch.Tensor, text: TextContext | None = None, image_mode: bool = False,
                       local_map: LocalMap | None = None) -> torch.Tensor:
        """Spatial latent (B, zc, T, h, w) -> frames (B, 3, T, 8h, 8w). `local_map`: see `decode`."""
        if image_mode:
            batch, frames = z1.shape[0], z1.shape[2]
            text = None if text is None else text.repeat_frames(frames)
            return _unfold_frames(self._decode_frames(_fold_frames(z1), text, False, local_map), batch)
        return self._decode_frames(z1, text, True, local_map)

    def _decode_frames(self, z1: torch.Tensor, text: TextContext | None, video: bool,
                       local_map: LocalMap | None = None) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z1 = self.post_quant_conv(z1)
        return self.decoder(z1, text, video, local_map)

    def encode_temporal(self, z1: torch.Tensor, text: TextContext | None = None) -> DiagonalGaussian:
        """Spatial latent (B, zc, T, h, w) -> temporal posterior over (B, zc, T/4, h, w)."""
        return DiagonalGaussian(self.encoder_temporal(z1, text))

    def decode_temporal(self, z: torch.Tensor, text: TextContext | None = None) -> torch.Tensor:
        """Latent (B, zc, T/4, h, w) -> spatial latent (B, zc, T, h, w)."""
        return self.decoder_temporal(z, text)

    # ---- public API ---------------------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        captions: Captions = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        sample_spatial: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        local_map: LocalMap | None = None,
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussian]:
        """Encode videos (T a multiple of 4) or images (T == 1) to the final posterior.

        The temporal stage reads the spatial posterior's mean unless `sample_spatial` is set.
        `local_map(fn, h, scale)` runs each level of the spatial encoder on its input `h` at 1/`scale` of
        the frame's resolution (frames first), for example tile by tile (`cmvae.tiling`): a level's
        outputs depend on a neighbourhood and on its GroupNorms' statistics only. The middle block's
        attention and the temporal stage see the whole frame at 1/8 resolution.
        """
        self._check_frames(x)
        text = self.text_context(x.shape[0], captions, context, context_mask)
        local_map = local_map or self._tiling_map()

        def moments(x: torch.Tensor, text: TextContext | None) -> torch.Tensor:
            if x.shape[2] == 1:
                return self.encode_spatial(x, text, image_mode=True, local_map=local_map).parameters
            return self._over_time(lambda chunk: self._video_moments(chunk, text, sample_spatial, generator,
                                                                     local_map), x, 1)

        with self._bounded():
            posterior = DiagonalGaussian(self._per_sample(moments, x, text))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _video_moments(self, x: torch.Tensor, text: TextContext | None, sample_spatial: bool,
                       generator: torch.Generator | None, local_map: LocalMap | None) -> torch.Tensor:
        spatial = self.encode_spatial(x, text, local_map=local_map)
        z1 = spatial.sample(generator) if sample_spatial else spatial.mode()
        return self.encode_temporal(z1, text).parameters

    def decode(
        self,
        z: torch.Tensor,
        captions: Captions = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        image_mode: bool | None = None,
        return_dict: bool = True,
        local_map: LocalMap | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode latents (B, zc, t, h, w) to (B, 3, 4t, 8h, 8w), or images in image mode.

        `image_mode=None` takes a latent with t == 1 for an image; pass `image_mode=False` to decode
        the single latent frame of a 4-frame video. `local_map(fn, h, scale)` runs each level of the
        spatial decoder (the lowest first; each starts with the previous level's upsample, and the last
        ends in the output layers), as in `encode`. A text model given no captions and no context decodes
        with the empty caption (see `text_context`). Returns diffusers' `DecoderOutput`.
        """
        self._check_latent(z)
        text = self.text_context(z.shape[0], captions, context, context_mask)
        image_mode = z.shape[2] == 1 if image_mode is None else image_mode
        local_map = local_map or self._tiling_map()

        def frames(z: torch.Tensor, text: TextContext | None) -> torch.Tensor:
            if image_mode:
                return self.decode_spatial(z, text, image_mode=True, local_map=local_map)
            return self._over_time(lambda chunk: self.decode_spatial(self.decode_temporal(chunk, text), text,
                                                                     local_map=local_map), z, self.cfg.temporal_compression)

        with self._bounded():
            sample = self._per_sample(frames, z, text)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(
        self,
        x: torch.Tensor,
        captions: Captions = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> CMVAEOutput:
        """Encode and decode. With `sample_posterior` both posteriors are sampled (as in training)."""
        self._check_frames(x)
        text = self.text_context(x.shape[0], captions, context, context_mask)
        image_mode = x.shape[2] == 1
        spatial = self.encode_spatial(x, text, image_mode=image_mode)
        z1 = spatial.sample(generator) if sample_posterior else spatial.mode()
        if image_mode:
            return CMVAEOutput(sample=self.decode_spatial(z1, text, image_mode=True), latent_dist=spatial,
                               spatial_dist=spatial)
        temporal = self.encode_temporal(z1, text)
        z = temporal.sample(generator) if sample_posterior else temporal.mode()
        sample = self.decode_spatial(self.decode_temporal(z, text), text)
        return CMVAEOutput(sample=sample, latent_dist=temporal, spatial_dist=spatial)

    # ---- latent normalisation ---------------------------------------------------------------

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) / latents_std per channel (dim 1): what a diffusion model trains on."""
        mean, std = self._latent_statistics(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize_latents`: a diffusion model's sample back to a latent to decode."""
        mean, std = self._latent_statistics(z)
        return z * std + mean

    def set_latent_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Put per-channel latent statistics (`cmvae encode-dataset`'s latent_stats.json) in the config."""
        self.cfg = self.cfg.replace(latents_mean=tuple(mean), latents_std=tuple(std))  # validates
        self.register_to_config(latents_mean=list(self.cfg.latents_mean), latents_std=list(self.cfg.latents_std))

    def _latent_statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.latents_mean is None or cfg.latents_std is None:
            raise ValueError("this model's config has no latents_mean / latents_std; measure them with "
                             "`cmvae encode-dataset` and add them with `cmvae convert MODEL -o FOLDER "
                             "--latent-stats latent_stats.json`")
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).reshape(shape)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).reshape(shape)
        return mean, std

    # ---- input checks -------------------------------------------------------------------------

    def _check_frames(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != 5:
            hint = " (for images, add a frame axis: x.unsqueeze(2))" if x.ndim == 4 else ""
            raise ValueError(f"expected a (B, {cfg.in_channels}, T, H, W) tensor, got shape {tuple(x.shape)}{hint}")
        _, c, t, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} channels (RGB in [-1, 1]) at dim 1, got {c}")
        f, s = cfg.temporal_compression, cfg.spatial_compression
        if t != 1 and t % f:
            raise ValueError(f"a video needs a multiple of {f} frames (or 1 for an image), got {t}: "
                             f"pad with copies of the last frame to {-(-t // f) * f}")
        if h % s or w % s:
            raise ValueError(f"height and width must be multiples of {s}, got {h}x{w}: "
                             f"pad to {-(-h // s) * s}x{-(-w // s) * s} and crop the output back")

    def _check_latent(self, z: torch.Tensor) -> None:
        zc = self.cfg.latent_channels
        if z.ndim != 5 or z.shape[1] != zc:
            raise ValueError(f"expected a latent of shape (B, {zc}, t, h, w), got {tuple(z.shape)}")


CrossModalVAE.register_for_auto_class("AutoModel")
