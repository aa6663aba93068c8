"""Captions to cross-attention context during training, with an optional on-disk embedding cache.

The cache keeps one file per caption (named by a hash of the encoder and the caption) holding the
embeddings of its real tokens only; padding is restored as zeros with a zero mask, which the
cross-attention ignores exactly, so cached and fresh embeddings give the same result.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ..models.autoencoder import CaptionEncoder


class CaptionEmbedder:
    """`embedder(captions, device) -> (context (N, L, D), mask (N, L))`, through `cache` when given."""

    def __init__(self, encoder: CaptionEncoder, cache: str | os.PathLike | None = None):
        self.encoder = encoder
        self.cache = Path(cache) if cache else None
        self._identity = f"{getattr(encoder, 'name', type(encoder).__name__)}|{getattr(encoder, 'max_length', '')}"
        if self.cache is not None:
            self.cache.mkdir(parents=True, exist_ok=True)

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            context, mask = self.encoder(list(captions))
            return context.to(device), mask.to(device)
        rows = {i: self._read(caption) for i, caption in enumerate(captions)}
        missing = [i for i, row in rows.items() if row is None]
        if missing:
            context, mask = self.encoder([captions[i] for i in missing])
            for j, i in enumerate(missing):
                rows[i] = self._write(captions[i], context[j], mask[j])
        length = max(row[2] for row in rows.values())
        context = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length)
        for i, (tokens, token_mask, _) in rows.items():
            context[i, : len(tokens)] = tokens
            mask[i, : len(token_mask)] = token_mask
        return context.to(device), mask.to(device)

    def _path(self, caption: str) -> Path:
        digest = hashlib.sha256(f"{self._identity}\0{caption}".encode()).hexdigest()[:40]
        return self.cache / digest[:2] / f"{digest}.pt"

    def _read(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        path = self._path(caption)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            return entry["tokens"], entry["mask"], int(entry["length"])
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            return None

    def _write(self, caption: str, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        kept = int(torch.nonzero(mask > 0.5).max()) + 1 if bool((mask > 0.5).any()) else 0
        entry = {"tokens": tokens[:kept].float().cpu().clone(), "mask": mask[:kept].float().cpu().clone(),
                 "length": mask.shape[0]}
        path = self._path(caption)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".", suffix=".pt", dir=path.parent)
        os.close(handle)
        try:
            torch.save(entry, name)
            os.replace(name, path)  # atomic: other processes may write the same caption at once
        finally:
            Path(name).unlink(missing_ok=True)
        return entry["tokens"], entry["mask"], entry["length"]
