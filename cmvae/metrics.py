"""Reconstruction metrics for videos and images, as docs/evaluation.md states them.

Frames are (H, W, 3) RGB arrays: `uint8` (0-255) or floating point in [0, 1]. Every metric works
on [0, 1] in float64, except LPIPS, which takes [-1, 1] as its network expects.

- `frame_psnr`: 10 log10(1 / MSE), peak 1; infinite for identical frames.
- `frame_ssim`: the authors' SSIM: scikit-image `structural_similarity` with `channel_axis=-1`
  and `data_range` = max - min of the ground-truth frame.
- `frame_ssim_standard`: the same function with `data_range = 1` (the full [0, 1] range).
- `temporal_psnr`: PSNR between the frame differences of the reconstruction and the ground truth.
- `Lpips`: LPIPS with the AlexNet backbone (the `lpips` package).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, the backbone LPIPS uses
_ALEXNET_PATTERN = re.compile(r"alexnet.*\.pth$")


class LpipsUnavailable(ValueError):
    """LPIPS was required but its backbone weights cannot be found or read."""


# ---- frames ---------------------------------------------------------------------------------------


def to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 (0-255) or float ([0, 1]) frames as float64 in [0, 1]."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or floating point in [0, 1], got dtype {frames.dtype}")
    return frames.astype(np.float64)


def quantize(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8 as a saved file holds them: clamp, scale by 255, round to nearest.

    Computed in the input's precision with ties to even, exactly as `cmvae.pipeline` rounds the
    frames it writes, so scoring in memory and scoring a lossless file agree bit for bit.
    """
    frames = np.asarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"quantize takes floating-point frames in [0, 1], got dtype {frames.dtype}")
    scale = frames.dtype.type(255)
    return np.rint(np.clip(frames, 0, 1) * scale).astype(np.uint8)


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b on the [0, 1] scale; exact for two uint8 frames (integers subtracted before scaling)."""
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        return (a.astype(np.int16) - b.astype(np.int16)) / 255.0
    return to_unit(a) - to_unit(b)


def _check_pair(reference: np.ndarray, reconstruction: np.ndarray) -> None:
    if reference.shape != reconstruction.shape:
        raise ValueError(f"frame shapes differ: ground truth {reference.shape}, reconstruction {reconstruction.shape}")
    if reference.ndim != 3 or reference.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) RGB frames, got shape {reference.shape}")


def _psnr_from_mse(mse: float) -> float:
    return float("inf") if mse == 0 else float(-10.0 * np.log10(mse))


def frame_psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of one frame on [0, 1] (peak 1)."""
    _check_pair(reference, reconstruction)
    return _psnr_from_mse(float(np.mean(_difference(reconstruction, reference) ** 2)))


def _check_ssim_size(frame: np.ndarray) -> None:
    if min(frame.shape[:2]) < 7:
        raise ValueError(f"SSIM needs frames of at least 7x7 pixels (its 7x7 window), "
                         f"got {frame.shape[1]}x{frame.shape[0]}")


def frame_ssim(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """The authors' SSIM: data_range is max - min of the ground-truth frame (on [0, 1]).

    SSIM does not change when both frames and data_range are scaled together, so this equals
    the same call on 0-255 values with the range measured there. For a constant ground-truth
    frame the range is 0 and scikit-image returns 0 or NaN; that is reported, not replaced.
    """
    _check_pair(reference, reconstruction)
    _check_ssim_size(reference)
    ref, rec = to_unit(reference), to_unit(reconstruction)
    data_range = float(ref.max() - ref.min())
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(structural_similarity(ref, rec, channel_axis=-1, data_range=data_range))


def frame_ssim_standard(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """SSIM with data_range = 1 on [0, 1] (255 on 8-bit values): scikit-image's defaults otherwise."""
    _check_pair(reference, reconstruction)
    _check_ssim_size(reference)
    return float(structural_similarity(to_unit(reference), to_unit(reconstruction), channel_axis=-1, data_range=1.0))


def temporal_psnr(reference_prev: np.ndarray, reference: np.ndarray,
                  reconstruction_prev: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR (peak 1) between x'[t] - x'[t-1] and x[t] - x[t-1], all on [0, 1]."""
    _check_pair(reference, reconstruction)
    true_step = _difference(reference, reference_prev)
    recon_step = _difference(reconstruction, reconstruction_prev)
    return _psnr_from_mse(float(np.mean((recon_step - true_step) ** 2)))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor,
         value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """PSNR in dB over all values of two tensors, both mapped from `value_range` to [0, 1] (peak 1).

    The reconstruction is clamped to `value_range` first, as saving it would; for quick checks
    such as the demo. Videos are scored frame by frame with `frame_psnr`.
    """
    low, high = value_range
    a = (reference.detach().double() - low) / (high - low)
    b = (reconstruction.detach().double().clamp(low, high) - low) / (high - low)
    return _psnr_from_mse(torch.mean((a - b) ** 2).item())


# ---- LPIPS ----------------------------------------------------------------------------------------


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint folder, where torchvision keeps downloaded weights (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_alexnet_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The AlexNet weights file: `path` if given (a file, or a folder holding it), else the hub cache's."""
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / ALEXNET_FILE
        if not path.is_file():
            raise LpipsUnavailable(f"LPIPS backbone weights not found at {path}")
        return path
    cached = hub_checkpoint_dir() / ALEXNET_FILE
    if cached.is_file():
        return cached
    # torchvision names its files by hash; accept another alexnet*.pth the user put there.
    others = sorted(p for p in hub_checkpoint_dir().glob("alexnet*.pth") if _ALEXNET_PATTERN.search(p.name))
    return others[0] if others else None


@dataclass
class Lpips:
    """LPIPS (AlexNet) on frames; `backbone` says where the AlexNet weights came from."""

    network: torch.nn.Module
    backbone: str
    device: torch.device

    @property
    def comparable(self) -> bool:
        """False for a random backbone: its numbers exercise the code, they mean nothing."""
        return self.backbone != "random"

    @torch.no_grad()
    def __call__(self, reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
        """Per-frame LPIPS of (N, H, W, 3) frames (uint8 or float [0, 1]) -> (N,) float64."""
        if reference.shape != reconstruction.shape:
            raise ValueError(f"frame shapes differ: {reference.shape} and {reconstruction.shape}")
        a = self._to_network(reference)
        b = self._to_network(reconstruction)
        return self.network(a, b).reshape(-1).double().cpu().numpy()

    def _to_network(self, frames: np.ndarray) -> torch.Tensor:
        unit = torch.from_numpy(to_unit(frames)).float()
        return (unit * 2.0 - 1.0).permute(0, 3, 1, 2).to(self.device)


def _lpips_network() -> torch.nn.Module:
    """The lpips package's AlexNet LPIPS with its shipped linear layers and an untrained backbone.

    `pnet_rand=True` keeps torchvision from downloading ImageNet weights; `load_alexnet` fills
    the backbone afterwards.
    """
    import lpips

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*", category=UserWarning)
        return lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False).eval()


def load_alexnet(network: torch.nn.Module, weights: Path) -> None:
    """Copy torchvision AlexNet `features.*` weights into an lpips network's backbone slices."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: torch raises many kinds
        raise LpipsUnavailable(f"cannot read LPIPS backbone weights {weights}: {error}") from None
    if not isinstance(state, dict):
        raise LpipsUnavailable(f"{weights} is not a state dict of AlexNet weights")
    backbone = dict(network.net.named_parameters())  # "slice1.0.weight" holds "features.0.weight"
    for name, parameter in backbone.items():
        source = "features." + name.split(".", 1)[1]
        tensor = state.get(source)
        if tensor is None or tuple(tensor.shape) != tuple(parameter.shape):
            raise LpipsUnavailable(f"{weights} does not hold torchvision AlexNet weights "
                                   f"({source} missing or of another shape)")
        with torch.no_grad():
            parameter.copy_(tensor)


def load_lpips(weights: str | os.PathLike | None = None, random_backbone: bool = False,
               device: str | torch.device = "cpu") -> Lpips:
    """LPIPS with the ImageNet AlexNet backbone from `weights` or torch hub's cache.

    Raises `LpipsUnavailable` when no weights are found. `random_backbone` skips them and keeps
    the untrained AlexNet: for testing the code path only.
    """
    network = _lpips_network()
    if random_backbone:
        backbone = "random"
    else:
        found = find_alexnet_weights(weights)
        if found is None:
            raise LpipsUnavailable(
                f"LPIPS needs torchvision's ImageNet AlexNet weights ({ALEXNET_FILE}), not found in "
                f"{hub_checkpoint_dir()} and this machine cannot download them; copy the file there or "
                "pass --lpips-weights PATH")
        load_alexnet(network, found)
        backbone = str(found)
    device = torch.device(device)
    return Lpips(network.to(device), backbone, device)
