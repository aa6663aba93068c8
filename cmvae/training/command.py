"""`cmvae train CONFIG [key=value ...]` and `cmvae export RUN -o FOLDER`.

`register(subparsers)` adds both to the `cmvae` command line; `python -m cmvae.training.command train ...`
runs them alone (also under `torchrun`).
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import Trainer

    logging.getLogger("cmvae.training").setLevel(logging.INFO)  # set-up summary and warnings, on rank 0
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config)
    try:
        run_dir = trainer.run()
    finally:
        trainer.close()
    if trainer.context.is_main:
        print(f"trained to step {trainer.step}; run folder {run_dir}")


def _export(args: argparse.Namespace) -> None:
    from .checkpoint import export_run

    folder = export_run(args.source, args.output, use_ema=not args.raw, overwrite=args.overwrite)
    print(f"wrote {folder}")


def register(subparsers) -> None:
    """Add the `train` and `export` commands to an argparse subparsers object."""
    train = subparsers.add_parser(
        "train", help="train or fine-tune a model from a YAML run file",
        description="Train a Cross-modal Video VAE. Overrides use dotted keys and YAML values, e.g. "
                    "optim.lr=2e-4 data.size=[128,128] loss.lpips=0. Under torchrun every process runs this.")
    train.add_argument("config", help="YAML run file (see configs/ and docs/training.md)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the run file")
    train.set_defaults(run=_train)

    export = subparsers.add_parser("export", help="write a trained run as a model folder for inference")
    export.add_argument("source", metavar="RUN", help="a run folder (its latest checkpoint) or a checkpoint file")
    export.add_argument("-o", "--output", required=True, help="model folder to write (config.json + safetensors)")
    export.add_argument("--raw", action="store_true", help="the trained weights, not their EMA")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a model folder that cmvae wrote before (only its own files)")
    export.set_defaults(run=_export)


def main(argv: list[str] | None = None) -> int:
    """The train and export commands alone, as `cmvae` runs them."""
    from ..command_core import new_parser, run

    parser, commands = new_parser("Cross-modal Video VAE: train and export.")
    register(commands)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
