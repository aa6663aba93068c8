"""The `cmvae` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """An error the user can fix; reported in one line with a non-zero exit."""


def _convert(args: argparse.Namespace) -> None:
    from .checkpoints import convert_checkpoint

    model, report = convert_checkpoint(args.checkpoint, args.output, config=args.config, dtype=DTYPES[args.dtype])
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {params:,} parameters; {report.describe()}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(preset=args.preset, size=args.size, frames=args.frames)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvae", description="Cross-modal Video VAE: encode, decode, convert.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="turn a released .ckpt (or any weights file) into a model folder")
    convert.add_argument("checkpoint", help="a .ckpt, .pt, .pth or .safetensors file")
    convert.add_argument("-o", "--output", required=True, help="model folder to write (config.json + safetensors)")
    convert.add_argument("--config", help="preset name or JSON file; default: read off the weights")
    convert.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="encode and decode a sample photograph and clip with a preset")
    demo.add_argument("--preset", default="tiny", help="model preset (random weights)")
    demo.add_argument("--size", type=int, default=128, help="side of the square frames (multiple of 8)")
    demo.add_argument("--frames", type=int, default=16, help="frames of the clip (multiple of 4)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .text import TextEncoderUnavailable

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.run(args)
    except (CommandError, CheckpointError, TextEncoderUnavailable, ValueError, OSError) as error:
        print(f"cmvae {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cmvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
