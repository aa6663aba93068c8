"""The `cmvae eval` and `cmvae compare` commands.

`register(subparsers)` adds both to the `cmvae` command line; `python -m cmvae.evaluation_command eval ...`
runs them alone (also under `torchrun`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EVAL_REPORT_FILES = ("report.json", "per_frame.csv", "per_video.csv", "pooled.csv", "report.md", "worst_frames.png")
COMPARE_REPORT_FILES = ("compare.json", "compare.csv", "compare.md", "compare.png")


def _device(name: str):
    import torch

    from .device import resolve_device

    device = resolve_device(name)
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", int(local_rank))  # one GPU per torchrun rank
    return device


def _lpips_options(args: argparse.Namespace):
    from .evaluation import LpipsOptions

    return LpipsOptions(enabled=not args.no_lpips, weights=args.lpips_weights, required=args.require_lpips,
                        random_backbone=args.lpips_random_backbone)


def _text_encoder(name: str | None):
    from .text import load_text_encoder

    return load_text_encoder(name) if name else None


def _pipeline_settings(args: argparse.Namespace, device):
    """The pipeline's defaults, except what the user set."""
    from .pipeline import PipelineSettings

    chosen = {"chunk_frames": args.chunk_frames, "tile": args.tile}
    return PipelineSettings(device=str(device), dtype=args.dtype, **{k: v for k, v in chosen.items() if v is not None})


def load_our_model(spec: str, config: str | None, device, dtype):
    """Our model from `default`, a model folder, a weights file or a preset name (random weights); and a note."""
    from .checkpoints import resolve_model
    from .models import PRESETS

    model = resolve_model(spec, config=config, dtype=dtype).to(device=device).eval()
    random = spec in PRESETS and not os.path.exists(spec)
    return model, f"preset {spec!r} at RANDOM weights" if random else None


def run_eval(args: argparse.Namespace) -> None:
    from .device import resolve_dtype
    from .evaluation import (EvalSettings, evaluate_folders, evaluate_model, is_main_rank, pipeline_reconstructor,
                             prepare_lpips, read_dataset, write_reports)

    _check_eval_arguments(args)
    _refuse_reports_over_inputs(args.output, EVAL_REPORT_FILES, args.ground_truth, args.reconstructions)
    settings = EvalSettings(float_scoring=args.float, max_frames=args.max_frames, chunk_frames=args.chunk_frames,
                            reencode_crf=args.reencode_crf, worst_frames=args.worst_frames)
    device = _device(args.device)
    lpips, lpips_note = prepare_lpips(_lpips_options(args), device)
    if args.model is None:
        report = evaluate_folders(args.ground_truth, args.reconstructions, settings, lpips, lpips_note)
        if args.report_html:
            _folder_pages(args)
    else:
        clips = read_dataset(args.ground_truth)
        model, model_note = load_our_model(args.model, args.config, device, resolve_dtype(args.dtype))
        text_encoder = _text_encoder(args.text_encoder) if model.cfg.has_text else None
        reconstructor = pipeline_reconstructor(model, text_encoder, _pipeline_settings(args, device))
        if args.report_html:
            reconstructor = _with_pages(reconstructor, clips, args)
        source = {"dataset": args.ground_truth, "model": args.model, "model_note": model_note,
                  "device": str(device), "dtype": args.dtype}
        report = evaluate_model(clips, reconstructor, settings, lpips, lpips_note, source)
    if is_main_rank():
        write_reports(report, args.output, plots=not args.no_plots, worst_frames=args.worst_frames)
        pooled = report.pooled
        lpips_text = f", LPIPS {pooled.lpips:.4f}" if pooled.lpips is not None else ""
        print(f"{len(report.videos)} videos, {pooled.frames} frames, pooled: PSNR {pooled.psnr:.2f} dB, "
              f"SSIM {pooled.ssim:.4f} (authors) / {pooled.ssim_standard:.4f} (range 1){lpips_text}")
        print(f"{report.lpips}")
        print(f"scoring: {report.scoring}")
        print(f"reports written to {args.output}")


def _page_path(folder: str, name: str) -> Path:
    from .evaluation import _safe_name

    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"view_{_safe_name(name)}.html"


def _folder_pages(args: argparse.Namespace) -> None:
    """A viewer page per pair of files, in the report folder."""
    from .evaluation import pair_folders
    from .viewer import write_file_page

    pairs, _ = pair_folders(args.ground_truth, args.reconstructions)
    for pair in pairs:
        write_file_page(_page_path(args.output, pair.name), pair.reference, [pair.reconstruction], args.max_frames)


def _with_pages(reconstructor, clips: list, args: argparse.Namespace):
    """The reconstructor, writing a viewer page for each clip as it goes (clips come in order, one process)."""
    from dataclasses import replace

    from .command_core import CommandError
    from .evaluation import distributed_world
    from .metrics import quantize
    from .video_io import probe
    from .viewer import write_page

    if distributed_world()[1] > 1:
        raise CommandError("--report-html runs in one process only, not under torchrun")
    pending = iter(clips)

    def reconstruct(frames, caption):
        output = reconstructor.reconstruct(frames, caption)
        clip = next(pending)
        write_page(_page_path(args.output, clip.name), frames, {args.model: quantize(output)}, probe(clip.path).fps,
                   f"cmvae eval: {clip.name}")
        return output

    return replace(reconstructor, reconstruct=reconstruct)


def _check_eval_arguments(args: argparse.Namespace) -> None:
    from .command_core import CommandError

    if (args.reconstructions is None) == (args.model is None):
        raise CommandError("give either a folder of reconstructions or --model (to reconstruct the dataset), not both")
    if args.model is None:
        for flag, value in (("--float", args.float), ("--reencode-crf", args.reencode_crf is not None),
                            ("--config", args.config), ("--text-encoder", args.text_encoder),
                            ("--tile", args.tile is not None)):
            if value:
                raise CommandError(f"{flag} applies to --model evaluation only; files are scored as they are")


def run_compare(args: argparse.Namespace) -> None:
    from .compare import CompareSettings, compare, write_reports
    from .device import resolve_dtype
    from .evaluation import prepare_lpips, read_dataset

    _refuse_reports_over_inputs(args.output, COMPARE_REPORT_FILES, args.clips)
    device = _device(args.device)
    settings = CompareSettings(device=str(device), dtype=resolve_dtype(args.dtype), chunk_frames=args.chunk_frames,
                               warmup=args.warmup, max_frames=args.max_frames, float_scoring=args.float)
    clips = read_dataset(args.clips)
    lpips, lpips_note = prepare_lpips(_lpips_options(args), device)
    text_encoder = _text_encoder(args.text_encoder) if args.text_encoder else None
    outputs: dict[str, dict] = {}
    keep = (lambda model, clip, frames: outputs.setdefault(clip.name, {}).__setitem__(model, frames)) \
        if args.report_html else None
    report = compare(clips, args.model, settings, lpips, lpips_note, text_encoder, keep_outputs=keep)
    write_reports(report, args.output)
    if args.report_html:
        _compare_pages(clips, outputs, args)
    for model in report.models:
        pooled, row = model.pooled, model.row()
        peak = max(row["encode_peak_mib"], row["decode_peak_mib"])
        print(f"{model.name} ({model.kind}, frames {model.frame_rule}): PSNR {pooled.psnr:.2f} dB, "
              f"SSIM {pooled.ssim:.4f}, encode {row['encode_ms_per_frame']:.1f} ms/frame, "
              f"decode {row['decode_ms_per_frame']:.1f} ms/frame, peak {peak:.0f} MiB")
    print(report.lpips)
    print(f"memory: {report.memory}")
    print(f"reports written to {args.output}")


def _compare_pages(clips: list, outputs: dict[str, dict], args: argparse.Namespace) -> None:
    """A viewer page per clip, every model of the comparison in its own column."""
    from .video_io import probe, read_video
    from .viewer import write_page

    for clip in clips:
        original = read_video(clip.path, max_frames=args.max_frames)
        write_page(_page_path(args.output, clip.name), original, outputs[clip.name], probe(clip.path).fps,
                   f"cmvae compare: {clip.name}")


def _refuse_reports_over_inputs(folder: str, report_files: tuple[str, ...], *inputs: str | None) -> None:
    """The reports go into a folder of their own: not an input folder, and over no input file."""
    from .files import refuse_overwriting_input

    for source in filter(None, inputs):
        refuse_overwriting_input(folder, source)
        for name in report_files:
            refuse_overwriting_input(Path(folder) / name, source)


def _common(parser: argparse.ArgumentParser, default_output: str) -> None:
    parser.add_argument("-o", "--output", default=default_output,
                        help="folder for the reports (created if missing; default: %(default)s)")
    parser.add_argument("--max-frames", type=int, help="score only the first N frames of each video")
    parser.add_argument("--float", action="store_true",
                        help="score in-memory reconstructions as floats (default: rounded to 8 bits like a saved file)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--report-html", action="store_true",
                        help="also write a viewer page per clip (view_<name>.html in the report folder; see `cmvae view`)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--text-encoder", help="for text models: t5 (the released models'), minilm, a hub name or a "
                                               "folder (default: the one of the model's width)")
    lpips = parser.add_argument_group("LPIPS")
    lpips.add_argument("--lpips-weights", help="torchvision's AlexNet weights file (alexnet-owt-7be5be79.pth) or its "
                                               "folder; default: torch hub's cache")
    lpips.add_argument("--require-lpips", action="store_true", help="fail if LPIPS cannot be computed")
    lpips.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS")
    lpips.add_argument("--lpips-random-backbone", action="store_true",
                       help="testing only: LPIPS with an untrained AlexNet (the values are meaningless)")


def register(subparsers) -> None:
    """Add `eval` and `compare` to an argparse subparsers object; each sets `run`."""
    evaluate = subparsers.add_parser(
        "eval", help="score reconstructions: two folders, or a model on a dataset",
        description="Score reconstructions against their ground truth (PSNR, SSIM, LPIPS, temporal consistency, "
                    "chunk boundaries), by the authors' protocol; see docs/evaluation.md.")
    evaluate.add_argument("ground_truth", help="folder of ground-truth videos; with --model: a folder, video, .csv "
                                               "(path, caption) or .txt list")
    evaluate.add_argument("reconstructions", nargs="?",
                          help="folder of reconstructions, matched by name (<name>.* or <name>_reconstructed.*)")
    evaluate.add_argument("--model", help="reconstruct in memory with our model: a model folder, a weights file, "
                                          "`default` (the shipped model) or a preset name (random weights)")
    evaluate.add_argument("--config", help="with a weights file: preset name or JSON config (default: read off it)")
    evaluate.add_argument("--chunk-frames", type=int,
                          help="two folders: the chunk length the reconstructions were made with (for the boundary "
                               "metrics); --model: the pipeline's chunk length (default 16)")
    evaluate.add_argument("--tile", type=int, help="with --model: the pipeline's spatial tile side in pixels, 0 = no "
                                                   "tiling as the authors ran it (default: the pipeline's, 256)")
    evaluate.add_argument("--reencode-crf", type=int, help="with --model: save reconstructions as H.264 at this CRF "
                                                           "and score the decoded file")
    evaluate.add_argument("--worst-frames", type=int, default=4, help="frames shown in worst_frames.png (default 4)")
    evaluate.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    _common(evaluate, "eval_report")
    evaluate.set_defaults(run=run_eval)

    comparison = subparsers.add_parser(
        "compare", help="several autoencoders on the same clips: metrics, time, memory",
        description="Run our models and diffusers video autoencoders on the same clips and tabulate metrics, "
                    "encode/decode time and peak memory.")
    comparison.add_argument("clips", help="a folder, video, .csv (path, caption) or .txt list of clips")
    comparison.add_argument("--model", action="append", required=True, metavar="[NAME=]SOURCE",
                            help="repeatable: our model folder, weights file, `default` or preset, or a diffusers "
                                 "autoencoder folder (AutoencoderKLWan, ...CogVideoX, ...HunyuanVideo, ...LTXVideo, "
                                 "AutoencoderKL)")
    comparison.add_argument("--chunk-frames", type=int, default=16, help="our models' chunk length (default 16)")
    comparison.add_argument("--warmup", type=int, default=1, help="untimed runs per model before timing (default 1)")
    _common(comparison, "compare_report")
    comparison.set_defaults(run=run_compare)


def main(argv: list[str] | None = None) -> int:
    """The eval and compare commands alone, as `cmvae` runs them."""
    from .command_core import new_parser, run

    parser, commands = new_parser("Cross-modal Video VAE: eval and compare.")
    register(commands)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
