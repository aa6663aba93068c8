"""Encode a dataset into latent shards for diffusion training: resumable, split across ranks.

Each rank takes the items whose index is its rank modulo the world size and writes shards
`shard-r<rank>-<first item>.safetensors` of up to `shard_size` items, each written under a
temporary name and renamed when complete. A run that finds shards in its output folder skips the
items they hold (matched by index and path: a changed list is refused), so a killed run continues
where it stopped; items that failed are in no shard, and the next run tries them again. When every rank is done, rank 0
writes `latent_stats.json`: per-channel mean and standard deviation of the latents and a single
scaling factor (1 / overall standard deviation), as diffusion training normalises with them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .datasets import MediaItem
from .files import atomic_path
from .pipeline import VideoPipeline
from .video_io import MediaError

SHARD_FORMAT = "cmvae-shard-1"
STATS_FILE = "latent_stats.json"


@dataclass
class EncodeReport:
    encoded: int = 0
    skipped_done: int = 0
    failed: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)


def _shard_items(path: Path) -> tuple[list[dict], dict]:
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        items = json.loads(meta.get("items", "[]"))
        if not all(isinstance(item, dict) and isinstance(item.get("index"), int) for item in items):
            raise ValueError("items without an index")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is damaged or not a shard of `cmvae encode-dataset` ({error}); move it away and "
                         "run again: its items are encoded again") from None
    return items, meta


def finished_items(out_dir: Path, fingerprint: str) -> dict[int, str]:
    """Item index -> path of the items already encoded in complete shards (failed items are not
    finished: a new run tries them again)."""
    done = {}
    for shard in sorted(out_dir.glob("shard-*.safetensors")):
        items, meta = _shard_items(shard)
        if meta.get("model_fingerprint") != fingerprint:
            raise ValueError(f"{shard} was written by another model (fingerprint {meta.get('model_fingerprint')}, "
                             f"this model is {fingerprint}); use an empty output folder")
        done.update((item["index"], item.get("path")) for item in items if "error" not in item)
    return done


def _check_same_items(done: dict[int, str], items: list[MediaItem], out_dir: Path) -> None:
    """Finished items must be the list's items at the same places: an edited list is refused."""
    for item in items:
        if item.index in done and done[item.index] != str(item.path):
            raise ValueError(f"{out_dir} holds item {item.index} as {done[item.index]}, but the list now has "
                             f"{item.path} there: the list changed since those shards were written; use a new "
                             "output folder")


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, rank: int) -> None:
    with atomic_path(path, prefix=f".tmp-r{rank:02d}-") as temp:
        save_file(tensors, temp, metadata=metadata)


def _remove_stale_temporaries(out_dir: Path, rank: int) -> None:
    """Temporary shards a killed run of this rank left behind."""
    for stale in out_dir.glob(f".tmp-r{rank:02d}-*"):
        stale.unlink(missing_ok=True)


def encode_dataset(pipe: VideoPipeline, items: list[MediaItem], out_dir: str | os.PathLike, shard_size: int = 32,
                   store_logvar: bool = False, rank: int = 0, world_size: int = 1,
                   progress: bool = True) -> EncodeReport:
    """Encode this rank's share of `items` into shards under `out_dir`, skipping finished items."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir, rank)
    done = finished_items(out_dir, pipe.fingerprint)
    _check_same_items(done, items, out_dir)
    mine = [item for item in items if item.index % world_size == rank]
    todo = [item for item in mine if item.index not in done]
    report = EncodeReport(skipped_done=len(mine) - len(todo))
    tensors: dict[str, torch.Tensor] = {}
    records: list[dict] = []
    for item in tqdm(todo, desc=f"encode-dataset rank {rank}", unit="item", disable=not progress):
        record = {"index": item.index, "path": str(item.path), "caption": item.caption}
        try:
            encoded = pipe.encode(item.path, caption=item.caption)
        except MediaError as error:  # not written to a shard: the next run tries the item again
            report.failed.append(f"{item.path}: {error}")
            continue
        key = f"{item.index:08d}"
        tensors[f"{key}.latent"] = encoded.latent[0].contiguous()
        if store_logvar:
            tensors[f"{key}.logvar"] = encoded.logvar[0].contiguous()
        records.append({**record, "fps": str(encoded.fps), "width": encoded.width, "height": encoded.height,
                        "frames": encoded.frames, "is_image": encoded.is_image})
        report.encoded += 1
        if len(records) == shard_size:
            report.shards.append(_write_shard(out_dir, tensors, records, pipe, rank))
            tensors, records = {}, []
    if records:
        report.shards.append(_write_shard(out_dir, tensors, records, pipe, rank))
    return report


def _write_shard(out_dir: Path, tensors: dict, records: list[dict], pipe: VideoPipeline, rank: int) -> str:
    name = f"shard-r{rank:02d}-{records[0]['index']:08d}"
    path, copy = out_dir / f"{name}.safetensors", 1
    while path.exists():  # a shard of an older version that began with a failed item
        copy += 1
        path = out_dir / f"{name}-{copy}.safetensors"
    metadata = {"format": SHARD_FORMAT, "model_fingerprint": pipe.fingerprint, "items": json.dumps(records),
                "dtype": pipe.precision.dtype_name}
    _atomic_save(tensors, metadata, path, rank)
    return path.name


@dataclass
class LatentStats:
    mean: list[float]
    std: list[float]
    scaling_factor: float
    items: int
    values_per_channel: int


def latent_stats(out_dir: str | os.PathLike) -> LatentStats:
    """Per-channel mean and std over every latent value in the shards, and 1 / the overall std."""
    total = total_sq = None
    count = items = 0
    for shard in sorted(Path(out_dir).glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                if not key.endswith(".latent"):
                    continue
                latent = handle.get_tensor(key).double().flatten(1)  # (zc, values)
                total = latent.sum(1) if total is None else total + latent.sum(1)
                total_sq = latent.square().sum(1) if total_sq is None else total_sq + latent.square().sum(1)
                count += latent.shape[1]
                items += 1
    if not items:
        raise ValueError(f"no latents in {out_dir}")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    overall_mean = total.sum() / (count * len(total))
    overall_std = (total_sq.sum() / (count * len(total)) - overall_mean**2).sqrt()
    return LatentStats(mean.tolist(), std.tolist(), float(1.0 / overall_std), items, count)


def read_latent_stats(path: str | os.PathLike) -> LatentStats:
    """A latent_stats.json that `write_latent_stats` wrote (a folder: the one in it)."""
    path = Path(path)
    path = path / STATS_FILE if path.is_dir() else path
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        stats = LatentStats(**values)
        if not (isinstance(stats.mean, list) and isinstance(stats.std, list) and len(stats.mean) == len(stats.std)):
            raise TypeError("mean and std must be lists of one number per channel")
    except OSError as error:
        raise ValueError(f"cannot read latent statistics from {path}: {error.strerror or error}") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a {STATS_FILE} written by `cmvae encode-dataset` ({error})") from None
    return stats


def write_latent_stats(out_dir: str | os.PathLike) -> Path:
    stats = latent_stats(out_dir)
    path = Path(out_dir) / STATS_FILE
    with atomic_path(path, prefix=".tmp-stats-") as temp:
        temp.write_text(json.dumps(asdict(stats), indent=1))
    return path
