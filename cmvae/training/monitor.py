"""What a run reports: TensorBoard scalars and images, sample videos, a progress bar. Rank 0 only."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..video_io import write_video

logger = logging.getLogger(__name__)


def to_uint8_frames(clip: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    pixels = ((clip.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


class Monitor:
    """TensorBoard events in `run_dir/tensorboard`, sample videos in `run_dir/samples`, and a tqdm bar."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops what a killed launch logged after its checkpoint, and keeps the checkpoint's own step
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def summary(self, values: dict[str, float]) -> None:
        """Figures shown beside the progress bar (set on logging steps: reading them waits for the device)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            logger.info(text)

    def samples(self, step: int, pairs: list[tuple[torch.Tensor, torch.Tensor]], fps: float = 8.0) -> None:
        """Ground truth beside reconstruction: one mp4 per clip, and a strip of frames in TensorBoard."""
        if not self.enabled or not pairs:
            return
        folder = self.run_dir / "samples" / f"step-{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, (truth, reconstruction) in enumerate(pairs):
            side_by_side = np.concatenate([to_uint8_frames(truth), to_uint8_frames(reconstruction)], axis=2)
            write_video(folder / f"clip-{number}.mp4", side_by_side, fps=fps)
            if self.writer is not None:
                strip = np.concatenate(list(side_by_side[:: max(1, len(side_by_side) // 4)]), axis=0)
                self.writer.add_image(f"samples/clip-{number}", strip, step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
