"""Training and fine-tuning the Cross-modal Video VAE: the paper's losses and schedule, from one CPU to
many GPUs (torchrun with DDP or FSDP). See docs/training.md."""

from .checkpoint import export_run
from .config import ConfigError, TrainConfig, config_from_dict, load_config
from .trainer import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "config_from_dict", "export_run", "load_config"]
