"""The `cmvae attention` and `cmvae view` commands: thin layers over `cmvae.attention_maps` and `cmvae.viewer`."""

from __future__ import annotations

import argparse

from .command_core import DTYPE_NAMES, CommandError


def _words(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {value!r}")
    return words


def _read_clip(path: str, max_frames: int | None, resize: int | None):
    from .pipeline import resize_frames, to_tensor, to_uint8, to_unit
    from .video_io import probe, read_video

    info = probe(path)
    frames = read_video(path, max_frames)
    if resize:
        frames = to_uint8(to_unit(resize_frames(to_tensor(frames), resize, False)))
    return frames, info.fps


def run_attention(args: argparse.Namespace) -> None:
    from .attention_maps import attention_maps, write_outputs
    from .checkpoints import resolve_model
    from .files import refuse_overwriting_input
    from .memory import parse_size
    from .pipeline import PipelineSettings, VideoPipeline
    from .text import default_text_encoder, load_text_encoder

    refuse_overwriting_input(args.output, args.clip)
    cap = parse_size(args.max_record_memory)
    settings = PipelineSettings(device=args.device, dtype=args.dtype, memory_budget=args.max_memory, tile=args.tile)
    model = resolve_model(args.model, config=args.config)
    if not model.cfg.has_text:
        raise CommandError(f"model {args.model} has no text cross-attention (context_dim is None); attention maps "
                           "need a text model, e.g. --model tiny-text (random weights) or a trained text model")
    encoder = (load_text_encoder(args.text_encoder) if args.text_encoder
               else default_text_encoder(model.cfg.context_dim))
    frames, fps = _read_clip(args.clip, args.max_frames, args.resize)
    pipe = VideoPipeline(model, settings)
    maps = attention_maps(pipe.model, frames, args.caption, encoder, args.words, per_layer=args.per_layer,
                          chunk_frames=args.chunk_frames, chunk_overlap=args.chunk_overlap, memory_cap=cap,
                          local_map=pipe.local_map())
    written = write_outputs(maps, frames, args.output, fps, model_name=args.model)
    print(f"words: {', '.join(maps.words)}; maps of {len(frames)} frames on a {maps.cell}-pixel grid")
    print(f"wrote {len(written)} files to {args.output}")


def run_view(args: argparse.Namespace) -> None:
    from .viewer import read_attention_pictures, write_file_page

    attention = read_attention_pictures(args.attention) if args.attention else None
    target = write_file_page(args.output, args.original, args.reconstruction, args.max_frames, attention)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MB)")


def register(subparsers) -> None:
    """Add `attention` and `view` to the `cmvae` command line."""
    att = subparsers.add_parser("attention", help="cross-attention maps per caption word, as overlays and raw maps",
                                description="Record the cross-attention weight every patch gives each chosen word "
                                            "of the caption, on the encoder and the decoder side, and write overlay "
                                            "PNGs, an overlay video and the raw maps; see docs/visualisation.md.")
    att.add_argument("clip", help="video or image")
    att.add_argument("--caption", required=True, help="the caption the model reads")
    att.add_argument("--words", type=_words, help="comma-separated words of the caption (default: all of them)")
    att.add_argument("--model", required=True, help="a text model: folder, weights file or preset (e.g. tiny-text, "
                                                    "random weights)")
    att.add_argument("--config", help="config for a weights file whose config cannot be read off its keys")
    att.add_argument("--text-encoder", help="t5, minilm, a hub name or a folder (default: the model width's)")
    att.add_argument("-o", "--output", required=True, help="folder for the maps and overlays (created if missing)")
    att.add_argument("--per-layer", action="store_true", help="also keep every layer's maps in maps.safetensors")
    att.add_argument("--chunk-frames", type=int, default=16, help="frames per temporal chunk (default 16)")
    att.add_argument("--chunk-overlap", type=int, help="frames shared by chunks (default 4, or 0 for chunks shorter "
                                                     "than 8 frames)")
    att.add_argument("--max-frames", type=int, help="only the first N frames")
    att.add_argument("--resize", type=int, help="shorter side to N pixels first")
    att.add_argument("--max-record-memory", default="2GB", help="cap on the recorded maps' memory (default 2GB)")
    att.add_argument("--max-memory", metavar="SIZE", help="memory the model may use, as for reconstruct: levels that "
                                                          "do not fit run in bands or tiles (the maps are the same)")
    att.add_argument("--tile", type=int, help="expert override of --max-memory: square tiles of this many pixels")
    att.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    att.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="float32",
                     help="compute precision (default float32)")
    att.set_defaults(run=run_attention)

    view = subparsers.add_parser("view", help="one offline HTML page: original and reconstruction(s) in sync, "
                                              "scores per frame, difference heat maps",
                                 description="Write a self-contained HTML page (videos embedded) comparing an "
                                             "original with one or more reconstructions; see docs/visualisation.md.")
    view.add_argument("original", help="the original video")
    view.add_argument("reconstruction", nargs="+", help="reconstruction(s) of it, same size and frame count")
    view.add_argument("-o", "--output", default="report.html", help="page to write (default: report.html)")
    view.add_argument("--attention", help="folder written by `cmvae attention`, to show its overlays")
    view.add_argument("--max-frames", type=int, help="only the first N frames")
    view.set_defaults(run=run_view)
