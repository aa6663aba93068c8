"""One level of the spatial encoder or decoder run in horizontal bands of rows: exact, on bounded memory.

A level is a chain of layers whose output rows each depend on a few rows around them (3x3
convolutions reach one row up and one down), apart from GroupNorm, whose statistics pool the whole
frame and every frame of the chunk. In bands, each band reads the rows around it that it needs from a
tensor of the whole frame, and every GroupNorm's statistics are gathered band by band (row sums,
`groupnorm.RowSums`) before any band is normalised with them. The output is the whole-frame output:
bit for bit in bfloat16, and up to float rounding in float32 (convolution kernels sum in another
order on other shapes). Dropout is skipped: this is inference.

A level's steps are the encoder's input convolution, its residual blocks (each with its text
cross-attention, which works on patches of rows), and its downsampling; the decoder's upsampling (of
the previous level's output), blocks, and output layers. Residual blocks run in one of two modes:

- `layers`: layer by layer over the whole frame, the block's input and one buffer (updated in place
  band by band) at frame size: every layer runs once;
- `passes`: only the block's input at frame size; pass k runs every band through the first k
  layers to gather the statistics of the k-th GroupNorm, and the last pass writes the output, in
  place of the input where the widths agree. About 2 to 3 times the work of `layers`, half its memory.

A decoder level's first block reads the previous level's output upsampled: stored at frame size, or
recomputed from the smaller tensor each time rows are needed (three times in `layers` mode).

`plan_level` chooses, for a memory allowance, the cheapest mode of each step that fits, with the
tallest bands that fit; `run_level` runs the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Region, in_region
from .groupnorm import RowSums, normalize
from .layers import conv3d
from .resnet import ResnetBlock
from .spatial import LevelCall, SpatialEncoder

Stats = tuple[torch.Tensor, torch.Tensor]  # per-(sample, channel) mean and variance

# Working memory of a band per row it reads (its own and its halo), in rows of the step's widest tensor
# (N * T * W * channels values): the peak of tensors alive measured on bands of the default model and the
# 16z architecture, in float32 and bfloat16 (benchmarks/memory_model.py: at most 7.5, 5.6 and 2.0),
# plus a tenth, plus one row for the copy oneDNN makes of a float32 convolution's input that is not
# channels-last (not a tensor, so not measured as one).
BAND_WORKSPACE = {"layers": 9.0, "passes": 7.2, "whole rows": 3.2}


# ---- rows of tensors, stored or computed ------------------------------------------------------------


def _pad_rows(x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
    return F.pad(x, (0, 0, top, bottom)) if top or bottom else x


def _conv(x: torch.Tensor, conv: nn.Conv3d, padding: tuple[int, int, int]) -> torch.Tensor:
    """`F.conv3d`, float32 on the CPU through oneDNN as in `layers.Conv3d` (whole frames): PyTorch would send
    bands, which have few rows, to a native kernel that is several times slower and rounds differently."""
    return conv3d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


def conv_rows(conv: nn.Conv3d, inp: torch.Tensor, lo: int, a: int, b: int, height: int) -> torch.Tensor:
    """Rows [a, b) of a stride-1 convolution's output, from rows [lo, ...) of its input that cover the
    rows it reaches inside the frame; rows beyond the frame are the convolution's zero padding."""
    reach = conv.kernel_size[1] // 2
    start, stop = max(a - reach, 0), min(b + reach, height)
    x = _pad_rows(inp[..., start - lo:stop - lo, :], start - (a - reach), (b + reach) - stop)
    return _conv(x, conv, (conv.padding[0], 0, conv.padding[2]))


class Stored:
    """Rows of a tensor held at frame size."""

    def __init__(self, tensor: torch.Tensor, owned: bool):
        self.tensor, self.owned = tensor, owned
        self.shape = tensor.shape
        self.reference = tensor  # for the dtype, device and memory layout of new tensors

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.tensor[..., a:b, :]

    def release(self) -> None:
        """Frees the tensor's memory now, if nothing else may read it."""
        if self.owned:
            self.tensor.untyped_storage().resize_(0)


class Upsampled:
    """Rows of `Upsample(small)` (nearest-neighbour doubling, then a 3x3 convolution), computed when asked."""

    def __init__(self, small: Stored, conv: nn.Conv3d):
        self.small, self.conv = small, conv
        self.reference = small.tensor
        n, _, t, h, w = small.shape
        self.shape = torch.Size((n, conv.out_channels, t, 2 * h, 2 * w))

    def rows(self, a: int, b: int) -> torch.Tensor:
        height = self.shape[-2]
        lo, hi = max(a - 1, 0), min(b + 1, height)
        first, last = lo // 2, (hi + 1) // 2
        near = F.interpolate(self.small.rows(first, last), scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return conv_rows(self.conv, near[..., lo - 2 * first:hi - 2 * first, :], lo, a, b, height)

    def release(self) -> None:
        self.small.release()


def _new_like(x: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    layout = torch.channels_last_3d if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format
    return torch.empty((x.shape[0], channels, x.shape[2], height, width), dtype=x.dtype, device=x.device,
                       memory_format=layout)


def bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, height)) for a in range(0, height, rows)]


# ---- layers -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """out = [input +] conv(silu(norm(input))): the unit between two GroupNorms."""

    norm: nn.GroupNorm
    conv: nn.Conv3d
    residual: bool


def apply_layer(layer: Layer, stats: Stats, inp: torch.Tensor, lo: int, a: int, b: int, height: int) -> torch.Tensor:
    """Rows [a, b) of the layer's output from rows [lo, ...) of its input."""
    start, stop = max(a - 1, 0), min(b + 1, height)
    h = F.silu(normalize(inp[..., start - lo:stop - lo, :], *stats, layer.norm), inplace=True)
    out = conv_rows(layer.conv, h, start, a, b, height)
    if layer.residual:
        out += inp[..., a - lo:b - lo, :]
    return out


def block_layers(block: ResnetBlock, video: bool) -> tuple[list[Layer], Layer | None]:
    """The main path of a residual block as layers, and the temporal layer of its shortcut (video
    mode, width-changing blocks)."""
    main = [Layer(block.norm1, block.conv1, False)]
    if video:
        main.append(Layer(block.conv1_tmp.norm, block.conv1_tmp.conv, True))
    main.append(Layer(block.norm2, block.conv2, False))
    if video:
        main.append(Layer(block.conv2_tmp.norm, block.conv2_tmp.conv, True))
    shortcut = None
    if block.nin_shortcut is not None and video:
        shortcut = Layer(block.conv3_tmp.norm, block.conv3_tmp.conv, True)
    return main, shortcut


def chain_rows(layers: list[Layer], stats: list[Stats], inp: torch.Tensor, lo: int, a: int, b: int,
               height: int) -> torch.Tensor:
    """Rows [a, b) of the last layer's output, running each layer on the rows the next ones need;
    `inp` holds rows [lo, ...) of the first layer's input, covering `len(layers)` rows either side."""
    h = inp
    for i, layer in enumerate(layers):
        reach = len(layers) - 1 - i
        out_a, out_b = max(a - reach, 0), min(b + reach, height)
        h, lo = apply_layer(layer, stats[i], h, lo, out_a, out_b, height), out_a
    return h


def sweep_in_place(tensor: torch.Tensor, fn, row_bands: list[tuple[int, int]], reach: int,
                   sums: RowSums | None = None) -> None:
    """tensor[rows a..b] = fn(input rows, first row, a, b) band by band, top to bottom, where fn reads up
    to `reach` rows either side: the rows above, already overwritten, come from a copy kept of them."""
    height = tensor.shape[-2]
    above = None  # the original rows [a - reach, a), saved before the band above was written
    for a, b in row_bands:
        lo = max(a - reach, 0)
        fresh = tensor[..., a:min(b + reach, height), :]
        inp = fresh if lo == a else torch.cat([above[..., above.shape[-2] - (a - lo):, :], fresh], dim=-2)
        out = fn(inp, lo, a, b)
        above = tensor[..., max(b - reach, a):b, :].clone()
        tensor[..., a:b, :] = out
        if sums is not None:
            sums.add(out, a)


# ---- steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to run a step: the memory it allocates at frame size (alive at once, beside the step's
    input), what of it remains as the step's output, working memory per band row, and the work
    (multiply-accumulates per output pixel) that ranks the options."""

    mode: str
    new_bytes: int
    output_bytes: int
    row_bytes: int
    work: float
    halo: int = 1  # rows a band reads beyond its own, either side
    in_place: bool = False


@dataclass
class Step:
    """A part of a level between two tensors held at frame size."""

    kind: str  # conv_in, block, downsample or output
    name: str
    height: int  # rows of the step's output
    align: int  # band boundaries fall on multiples of this
    options: list[Option]
    module: nn.Module
    attention: nn.Module | None = None  # the text cross-attention after a block
    upsample: nn.Module | None = None  # the decoder's upsampling, before its first block


@dataclass(frozen=True)
class Choice:
    option: Option
    rows: int


@dataclass
class LevelPlan:
    steps: list[Step]
    choices: list[Choice]
    peak_bytes: int  # predicted, above the memory in use when the level starts (its input included)

    def describe(self) -> str:
        return "; ".join(f"{step.name}: {choice.option.mode}, bands of {choice.rows} rows"
                         for step, choice in zip(self.steps, self.choices))


def _macs(conv: nn.Conv3d) -> int:
    return conv.weight.numel()


def _plain(name: str, kind: str, module: nn.Module, height: int, out_bytes: int, row_bytes: float, macs: int,
           align: int = 1) -> Step:
    option = Option("whole rows", out_bytes, out_bytes, int(row_bytes), macs)
    return Step(kind, name, height, align, [option], module)


def _block_options(block: ResnetBlock, video: bool, out_bytes: int, row_unit: int, upsample: nn.Module | None,
                   up_bytes: int, may_overwrite: bool) -> list[Option]:
    layers, shortcut = block_layers(block, video)
    macs = [_macs(layer.conv) for layer in layers]
    once = sum(macs) + sum(_macs(conv) for conv in (block.nin_shortcut, shortcut and shortcut.conv) if conv is not None)
    layers_rows = int(BAND_WORKSPACE["layers"] * row_unit)
    if upsample is not None:
        up = _macs(upsample.conv)
        return [Option("layers, upsampled input stored", up_bytes + out_bytes, out_bytes, layers_rows, once + up),
                Option("layers, upsampled input recomputed", out_bytes, out_bytes, layers_rows, once + 3 * up)]
    repeated = sum(sum(macs[:k]) for k in range(1, len(macs)))  # pass k reruns the first k layers
    in_place = may_overwrite and block.nin_shortcut is None
    return [Option("layers", out_bytes, out_bytes, layers_rows, once),
            Option("passes", 0 if in_place else out_bytes, out_bytes, int(BAND_WORKSPACE["passes"] * row_unit),
                   once + repeated, len(layers), in_place)]


def level_steps(call: LevelCall, shape: torch.Size, element: int) -> list[Step]:
    """The steps of a level for an input of `shape` and `element` bytes per value, with their options."""
    coder, level, video = call.coder, call.level, call.video
    n, channels, frames, height, width = shape
    steps: list[Step] = []

    def frame_bytes(c: int, h: int, w: int) -> int:
        return n * c * frames * h * w * element

    def row_unit(c: int, w: int) -> int:
        return n * frames * w * c * element

    def add_blocks(stage: nn.Module, h: int, w: int, c_in: int, upsample: nn.Module | None) -> int:
        align = max(2, stage.attn[0].patch_size if len(stage.attn) else 1)
        for i, block in enumerate(stage.block):
            c_out = block.conv1.out_channels
            first_up = upsample if i == 0 else None
            options = _block_options(block, video, frame_bytes(c_out, h, w), row_unit(max(c_in, c_out), w), first_up,
                                     frame_bytes(c_in, h, w), bool(steps) or call.owns_input)
            steps.append(Step("block", f"{_coder_name(coder)} level {level} block {i}", h, align, options, block,
                              stage.attn[i] if len(stage.attn) else None, first_up))
            c_in = c_out
        return c_in

    if isinstance(coder, SpatialEncoder):
        if level == 0:
            conv = coder.conv_in
            channels = conv.out_channels
            steps.append(_plain("encoder input convolution", "conv_in", conv, height,
                                frame_bytes(channels, height, width), BAND_WORKSPACE["whole rows"] * row_unit(channels, width),
                                _macs(conv), align=2))
        stage = coder.down[level]
        channels = add_blocks(stage, height, width, channels, None)
        if stage.downsample is not None:
            steps.append(_plain(f"encoder level {level} downsampling", "downsample", stage.downsample, height // 2,
                                frame_bytes(channels, height // 2, width // 2),
                                BAND_WORKSPACE["whole rows"] * 2 * row_unit(channels, width), _macs(stage.downsample.conv)))
        return steps
    upsample = None
    if level < len(coder.up) - 1:
        upsample = coder.up[level + 1].upsample
        height, width = 2 * height, 2 * width
    channels = add_blocks(coder.up[level], height, width, channels, upsample)
    if level == 0:
        conv = coder.conv_out
        steps.append(_plain("decoder output layers", "output", coder, height,
                            frame_bytes(conv.out_channels, height, width),
                            BAND_WORKSPACE["whole rows"] * row_unit(channels, width), _macs(conv)))
    return steps


def _coder_name(coder: nn.Module) -> str:
    return "encoder" if isinstance(coder, SpatialEncoder) else "decoder"


# ---- planning ---------------------------------------------------------------------------------------


def plan_level(call: LevelCall, shape: torch.Size, element: int, allowance: int, min_rows: int = 4,
               modes: tuple[str, ...] | None = None, max_rows: int | None = None) -> LevelPlan | None:
    """For each step the option with the least work, in the tallest bands, that keeps the memory the
    level adds to what is in use at its start (its input included) within `allowance` bytes; None
    if no plan fits. `modes` restricts blocks to options whose names start with one of them;
    `max_rows` caps the bands (for tests)."""
    steps = level_steps(call, shape, element)
    if modes is not None:
        for step in steps:
            if step.kind == "block":
                step.options = [o for o in step.options if o.mode.startswith(modes)]
    input_bytes = math.prod(shape) * element
    held = 0  # bytes of the current step's input, where an earlier step of the level made it
    released = 0  # bytes of the level's input freed (the model allows it once the level has read it)
    reads_level_input = True
    choices, peak = [], 0
    for step in steps:
        base = held - released
        choice = _cheapest(step, allowance - base, min_rows)
        if choice is None:
            return None
        if max_rows is not None and choice.rows > max_rows:
            choice = Choice(choice.option, max(max_rows // step.align, 1) * step.align)
        choices.append(choice)
        option = choice.option
        peak = max(peak, base + option.new_bytes + (choice.rows + 2 * option.halo) * option.row_bytes)
        if option.in_place:
            continue
        if reads_level_input:
            released = input_bytes if call.owns_input else 0
            reads_level_input = False
        held = option.output_bytes
    return LevelPlan(steps, choices, peak)


def _cheapest(step: Step, room: int, min_rows: int) -> Choice | None:
    for option in sorted(step.options, key=lambda o: o.work):
        rows = _rows_that_fit(room - option.new_bytes, option, step, min_rows)
        if rows:
            return Choice(option, rows)
    return None


def _rows_that_fit(room: int, option: Option, step: Step, min_rows: int) -> int:
    if room <= 0:
        return 0
    rows = room // max(option.row_bytes, 1) - 2 * option.halo
    if rows >= step.height:
        return step.height
    rows = rows // step.align * step.align
    return rows if rows >= max(min_rows, option.halo, step.align) else 0


# ---- running ----------------------------------------------------------------------------------------


def run_level(call: LevelCall, x: torch.Tensor, plan: LevelPlan) -> torch.Tensor:
    """The level's output, as `call(x)` gives it, run step by step in bands as `plan` says."""
    source: Stored = Stored(x, owned=call.owns_input)
    for step, choice in zip(plan.steps, plan.choices):
        row_bands = bands(step.height, choice.rows)
        if step.kind == "block":
            result = _run_block(step, choice.option, source, row_bands, call)
        else:
            result = _RUNNERS[step.kind](step, source, row_bands)
        if result is not source:
            source.release()
        source = result
    return source.tensor


def _statistics(source: Stored | Upsampled, row_bands, norm: nn.GroupNorm) -> Stats:
    sums = RowSums(source.shape, norm.weight.device)
    for a, b in row_bands:
        sums.add(source.rows(a, b), a)
    return sums.finish(norm.num_groups)


def _run_conv_in(step: Step, source: Stored, row_bands) -> Stored:
    conv, height = step.module, step.height
    out = _new_like(source.tensor, conv.out_channels, height, source.shape[-1])
    for a, b in row_bands:
        lo = max(a - 1, 0)
        out[..., a:b, :] = conv_rows(conv, source.rows(lo, min(b + 1, height)), lo, a, b, height)
    return Stored(out, owned=True)


def _run_downsample(step: Step, source: Stored, row_bands) -> Stored:
    conv, rows_in = step.module.conv, source.shape[-2]
    out = _new_like(source.tensor, conv.out_channels, step.height, source.shape[-1] // 2)
    for a, b in row_bands:  # output row q reads input rows 2q to 2q + 2; the row below the frame is zero
        start, stop = 2 * a, min(2 * b + 1, rows_in)
        x = F.pad(source.rows(start, stop), (0, 1, 0, 2 * b + 1 - stop))
        out[..., a:b, :] = _conv(x, conv, (0, 0, 0))
    return Stored(out, owned=True)


def _run_output(step: Step, source: Stored, row_bands) -> Stored:
    decoder, height = step.module, step.height
    layer = Layer(decoder.norm_out, decoder.conv_out, False)
    stats = _statistics(source, row_bands, decoder.norm_out)
    out = _new_like(source.tensor, decoder.conv_out.out_channels, height, source.shape[-1])
    for a, b in row_bands:
        lo = max(a - 1, 0)
        out[..., a:b, :] = apply_layer(layer, stats, source.rows(lo, min(b + 1, height)), lo, a, b, height)
    return Stored(out, owned=True)


_RUNNERS = {"conv_in": _run_conv_in, "downsample": _run_downsample, "output": _run_output}


def _block_input(step: Step, option: Option, source: Stored, row_bands) -> Stored | Upsampled:
    if step.upsample is None:
        return source
    upsampled = Upsampled(source, step.upsample.conv)
    if "stored" not in option.mode:
        return upsampled
    out = _new_like(source.reference, upsampled.shape[1], *upsampled.shape[-2:])
    for a, b in row_bands:
        out[..., a:b, :] = upsampled.rows(a, b)
    return Stored(out, owned=True)


def _run_block(step: Step, option: Option, source: Stored, row_bands, call: LevelCall) -> Stored:
    block, height = step.module, step.height
    inp = _block_input(step, option, source, row_bands)
    main, shortcut = block_layers(block, call.video)
    stats = [_statistics(inp, row_bands, block.norm1)]
    shortcut_stats = _shortcut_statistics(block, shortcut, inp, row_bands) if shortcut is not None else None

    def finish(band: torch.Tensor, rows: torch.Tensor, lo: int, a: int, b: int) -> torch.Tensor:
        """The block's output rows from its main path's: plus the shortcut, then the cross-attention."""
        band += _shortcut_rows(block, shortcut, shortcut_stats, rows, lo, a, b, height)
        if step.attention is not None:
            rows_of_frame = (a / height, b / height)
            with in_region(Region(rows_of_frame, (0.0, 1.0), rows_of_frame, (0.0, 1.0))):
                band += step.attention(band, call.text)
        return band

    if option.mode.startswith("layers"):
        out = _layers(main, stats, inp, row_bands, height, finish)
    else:
        out = _passes(main, stats, inp, row_bands, height, finish, option.in_place)
    if inp is not source:
        inp.release()
    return out


def _shortcut_statistics(block: ResnetBlock, shortcut: Layer, source, row_bands) -> Stats:
    sums = None
    for a, b in row_bands:
        s = conv_rows(block.nin_shortcut, source.rows(a, b), a, a, b, source.shape[-2])
        if sums is None:
            sums = RowSums((*s.shape[:3], source.shape[-2], s.shape[-1]), s.device)
        sums.add(s, a)
    return sums.finish(shortcut.norm.num_groups)


def _shortcut_rows(block: ResnetBlock, shortcut: Layer | None, stats: Stats | None, rows: torch.Tensor, lo: int,
                   a: int, b: int, height: int) -> torch.Tensor:
    """Rows [a, b) of the block's shortcut from rows [lo, ...) of its input (one row beyond either side)."""
    if block.nin_shortcut is None:
        return rows[..., a - lo:b - lo, :]
    if shortcut is None:
        return conv_rows(block.nin_shortcut, rows, lo, a, b, height)
    start, stop = max(a - 1, 0), min(b + 1, height)
    s = conv_rows(block.nin_shortcut, rows, lo, start, stop, height)
    return apply_layer(shortcut, stats, s, start, a, b, height)


def _layers(main: list[Layer], stats: list[Stats], inp, row_bands, height: int, finish) -> Stored:
    first = main[0]
    out = _new_like(inp.reference, first.conv.out_channels, height, inp.shape[-1])
    sums = RowSums(out.shape, out.device)
    for a, b in row_bands:
        lo = max(a - 1, 0)
        y = apply_layer(first, stats[0], inp.rows(lo, min(b + 1, height)), lo, a, b, height)
        out[..., a:b, :] = y
        sums.add(y, a)
    for i, layer in enumerate(main[1:], 1):
        layer_stats = sums.finish(layer.norm.num_groups)
        sums = RowSums(out.shape, out.device) if i + 1 < len(main) else None

        def run(rows, lo, a, b, layer=layer, layer_stats=layer_stats):
            return apply_layer(layer, layer_stats, rows, lo, a, b, height)

        sweep_in_place(out, run, row_bands, 1, sums)
    for a, b in row_bands:
        lo = max(a - 1, 0)
        finish(out[..., a:b, :], inp.rows(lo, min(b + 1, height)), lo, a, b)
    return Stored(out, owned=True)


def _passes(main: list[Layer], stats: list[Stats], inp, row_bands, height: int, finish, in_place: bool) -> Stored:
    """Pass k runs the first k layers on every band for the statistics of layer k's GroupNorm; the last
    pass runs them all and writes the output (over the input, when `in_place`)."""
    for k in range(1, len(main)):
        sums = None
        for a, b in row_bands:
            lo = max(a - k, 0)
            y = chain_rows(main[:k], stats, inp.rows(lo, min(b + k, height)), lo, a, b, height)
            if sums is None:
                sums = RowSums((*y.shape[:3], height, y.shape[-1]), y.device)
            sums.add(y, a)
        stats.append(sums.finish(main[k].norm.num_groups))
    reach = len(main)

    def run(rows, lo, a, b):
        return finish(chain_rows(main, stats, rows, lo, a, b, height), rows, lo, a, b)

    if in_place:
        sweep_in_place(inp.tensor, run, row_bands, reach)
        return inp
    out = _new_like(inp.reference, main[-1].conv.out_channels, height, inp.shape[-1])
    for a, b in row_bands:
        lo = max(a - reach, 0)
        out[..., a:b, :] = run(inp.rows(lo, min(b + reach, height)), lo, a, b)
    return Stored(out, owned=True)
