"""The configuration of a training run: typed sections, read from YAML, overridden with `key=value`.

A run file has the sections below; every key has a default except the data sources. Overrides
use dotted keys and YAML values: `loss.lpips=0`, `data.size=[64,64]`, `model.trainable=[temporal]`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the key."""


@dataclass
class RunConfig:
    output: str = "runs/cmvae"  # run folder: config.yaml, checkpoints/, tensorboard/, samples/, model/
    steps: int = 1000  # optimizer steps
    max_seconds: float | None = None  # also stop after this much training time; the schedule follows it
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N (torchrun picks cuda:LOCAL_RANK)
    precision: str = "auto"  # auto, float32, bfloat16 (autocast); auto = bfloat16 where it is fast
    memory_format: str = "auto"  # auto, channels_last, contiguous; auto = channels-last 3D where it is fast
    compile: str = "none"  # none, or a torch.compile mode for the model: default, reduce-overhead (CUDA
    # graphs), max-autotune; pays on GPUs for runs longer than the minute or two it takes to compile
    resume: str = "auto"  # auto: continue from the latest checkpoint in `output`; never; or a checkpoint file
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    export_model: bool = True  # write `output`/model (the inference format) at the end
    progress: bool = True  # tqdm progress bar on rank 0
    trace_data: bool = False  # rank 0 writes data-trace.jsonl: which files each rank trained on


@dataclass
class ModelConfig:
    init: str = "scratch"  # scratch (fresh weights), inflate (from a 2D image VAE), pretrained (weights file/folder)
    preset: str | None = None  # architecture: a preset name (see cmvae.PRESETS)
    config: dict = field(default_factory=dict)  # CMVAEConfig fields that change the preset
    weights: str | None = None  # inflate: image VAE folder/file; pretrained: .ckpt/.safetensors/model folder
    trainable: list = field(default_factory=lambda: ["all"])  # group names or regular expressions
    gradient_checkpointing: bool = False
    sample_posterior: bool = True  # sample both posteriors in training (as the paper); false: use the means


@dataclass
class TextConfig:
    encoder: str | None = None  # minilm, t5, or a Hugging Face name/folder; required for text models
    cache: str | None = None  # folder of precomputed caption embeddings (filled as captions are met)
    caption_dropout: float = 0.0  # share of captions replaced by the empty caption


@dataclass
class DataConfig:
    videos: list = field(default_factory=list)  # CSV/JSONL lists, .txt lists or folders
    images: list = field(default_factory=list)  # for image batches; empty: single frames of the videos
    root: str | None = None  # base of relative paths in lists; default: the list's own folder
    path_column: str = "path"
    caption_column: str = "caption"
    frames: int = 16
    stride: int | list = 4  # take every stride-th frame (a list: each clip draws one); consecutive frames
    # for videos too short for that
    size: int | list = field(default_factory=lambda: [216, 216])  # training height and width, or one side
    batch_size: int = 1  # per process
    image_batch_size: int | None = None  # per process; default: batch_size
    image_every: int = 5  # every image_every-th batch is an image batch; 0: videos only; 1: images only
    loader: str = "workers"  # workers: DataLoader processes decode each batch with PyAV; resident: every
    # file is decoded once and kept as uint8 on the training device, batches cut there (data that fits
    # in memory; packs, see cmvae.training.resident, are always resident)
    workers: int = 2  # DataLoader processes decoding with PyAV
    prefetch: int = 2  # batches each worker prepares ahead


@dataclass
class ValidationConfig:
    videos: list = field(default_factory=list)  # sources as in data.videos; empty: no validation
    clips: int = 4  # the first `clips` videos, one centred clip each
    every: int = 500
    size: int | list | None = None  # height and width of the centred clips; default: data.size
    stride: int | None = None  # frame step of the clips; default: data.stride (its smallest)
    samples: int = 2  # reconstructed clips written as videos and to TensorBoard


@dataclass
class LossConfig:
    l1: float = 1.0
    lpips: float = 1.0  # LPIPS with the VGG backbone; 0 switches it off (no weights needed)
    lpips_vgg_weights: str | None = None  # vgg16-397923af.pth; default: the torch hub cache; "random": an
    # untrained backbone (same cost, meaningless values: for benchmarks and tests only)
    kl: float = 1.0e-6  # on the final posterior
    disc_weight: float = 0.5  # times the adaptive weight
    disc_start: int = 50001  # first step with the GAN terms (the authors' value)
    disc_filters: int = 64
    disc_layers: int = 3
    adaptive_weight: bool = True  # false: the GAN term is weighted by disc_weight alone


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam (the paper's) or sgd (updates proportional to the gradients)
    lr: float = 1.0e-4
    betas: list = field(default_factory=lambda: [0.5, 0.9])
    eps: float = 1.0e-8  # Adam's epsilon
    momentum: float = 0.0  # SGD only
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate
    schedule: str = "constant"  # constant, or cosine: from lr down to min_lr at run.steps
    min_lr: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = None  # max gradient norm of the autoencoder; null: no clipping
    disc_lr: float | None = None  # default: lr
    ema_decay: float | None = None  # e.g. 0.999; null: no EMA
    fused: bool | None = None  # fused Adam (one kernel, no host reads of its step counts); null: where it can


@dataclass
class DistributedConfig:
    strategy: str = "auto"  # auto (ddp under torchrun, else none), none, ddp, fsdp
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs), nccl, gloo


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def size(self) -> tuple[int, int]:
        return _pair(self.data.size)

    @property
    def validation_size(self) -> tuple[int, int]:
        return _pair(self.validation.size) if self.validation.size is not None else self.size


CHOICES = {
    "run.precision": ("auto", "float32", "bfloat16"),
    "run.memory_format": ("auto", "channels_last", "contiguous"),
    "run.compile": ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.loader": ("workers", "resident"),
    "optim.schedule": ("constant", "cosine"),
    "optim.optimizer": ("adam", "sgd"),
    "model.init": ("scratch", "inflate", "pretrained"),
    "distributed.strategy": ("auto", "none", "ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


# ---- reading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The run configuration from a YAML file (or the defaults) with `key=value` overrides applied."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (run:, model:, data:, ...)")
    for override in overrides:
        _apply_override(values, override)
    config = _build(TrainConfig, values, "")
    validate(config)
    return config


def config_from_dict(values: dict) -> TrainConfig:
    config = _build(TrainConfig, values, "")
    validate(config)
    return config


def _apply_override(values: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. optim.lr=2e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + u for u in unknown)} "
                          f"(known in {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Check `value` against a field's type; ints pass where floats are expected."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be empty")
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if option is list and isinstance(value, (list, tuple)):
            return list(value)
        if option is list and isinstance(value, str):
            return [value]  # a single source or group may be written without brackets
        if option is dict and isinstance(value, dict):
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pair(size) -> tuple[int, int]:
    values = list(size) if isinstance(size, (list, tuple)) else [size]
    if len(values) == 1:
        values = values * 2
    return int(values[0]), int(values[1])


# ---- checks -----------------------------------------------------------------------------------


def validate(config: TrainConfig) -> None:
    """Reject values that cannot work, naming the key."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    run, data, optim, loss = config.run, config.data, config.optim, config.loss
    positive = {"run.steps": run.steps, "run.log_every": run.log_every, "run.checkpoint_every": run.checkpoint_every,
                "run.keep_checkpoints": run.keep_checkpoints, "data.frames": data.frames,
                "data.batch_size": data.batch_size, "optim.grad_accum": optim.grad_accum,
                "validation.every": config.validation.every, "loss.disc_filters": loss.disc_filters,
                "loss.disc_layers": loss.disc_layers}
    if data.image_batch_size is not None:
        positive["data.image_batch_size"] = data.image_batch_size
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    strides = data.stride if isinstance(data.stride, list) else [data.stride]
    if not strides or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in strides):
        raise ConfigError(f"data.stride must be a whole number of at least 1 or a list of them, got {data.stride!r}")
    nonnegative = {"data.image_every": data.image_every, "data.workers": data.workers, "loss.l1": loss.l1,
                   "loss.lpips": loss.lpips, "loss.kl": loss.kl, "loss.disc_weight": loss.disc_weight,
                   "loss.disc_start": loss.disc_start, "optim.warmup_steps": optim.warmup_steps,
                   "validation.clips": config.validation.clips, "validation.samples": config.validation.samples}
    for key, value in nonnegative.items():
        if value < 0:
            raise ConfigError(f"{key} must not be negative, got {value}")
    if not data.videos:
        raise ConfigError("data.videos is empty: list at least one CSV/JSONL/.txt list or folder of videos")
    if data.frames % 4:
        raise ConfigError(f"data.frames must be a multiple of 4 (the temporal compression), got {data.frames}")
    try:
        height, width = config.size
    except (TypeError, ValueError):
        raise ConfigError(f"data.size must be a number or [height, width], got {data.size!r}") from None
    if height < 32 or width < 32 or height % 8 or width % 8:
        raise ConfigError(f"data.size must be multiples of 8 of at least 32 (the discriminator needs that), "
                          f"got {height}x{width}")
    if config.validation.size is not None:
        try:
            height, width = config.validation_size
        except (TypeError, ValueError):
            raise ConfigError(f"validation.size must be a number or [height, width], got {config.validation.size!r}") \
                from None
        if height % 8 or width % 8:
            raise ConfigError(f"validation.size must be multiples of 8, got {height}x{width}")
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {optim.betas!r}")
    if optim.eps <= 0:
        raise ConfigError(f"optim.eps must be positive, got {optim.eps}")
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {optim.lr}")
    if optim.ema_decay is not None and not 0.0 < optim.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must lie between 0 and 1, got {optim.ema_decay}")
    if not 0.0 <= config.text.caption_dropout <= 1.0:
        raise ConfigError(f"text.caption_dropout must lie in [0, 1], got {config.text.caption_dropout}")
    model = config.model
    if model.init in ("inflate", "pretrained") and not model.weights:
        raise ConfigError(f"model.init={model.init} needs model.weights (a file or folder)")
    if model.init == "scratch" and model.preset is None and not model.config:
        raise ConfigError("model.init=scratch needs model.preset (e.g. small-16z) or model.config")
