"""One self-contained HTML page to look at reconstructions: `write_page(original, {name: reconstruction})`.

The page holds everything (videos as base64 data URIs, data as JSON, script inline) and loads nothing
from the network. It shows the original and every reconstruction side by side playing in sync, a frame
slider, each reconstruction's difference heat map, per-frame PSNR and SSIM curves (a click seeks to the
frame), the worst frames, and attention overlays where given. Videos are H.264 in 4:2:0 (mp4), which
every browser plays; a frame k is shown by seeking to (k + 0.5) / fps, the middle of its display time.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .files import atomic_path
from .metrics import frame_psnr, frame_ssim

PAGE_LIMIT = 50 * 2**20  # bytes
CRF_STEPS = (23, 28, 33, 38, 44)  # tried in turn until the page fits PAGE_LIMIT
MAX_HEIGHT = 720  # taller videos are scaled down for the page (the scores use the full frames)
DIFFERENCE_GAIN = 4.0  # |difference| x gain, so that small errors show


@dataclass
class Reconstruction:
    name: str
    frames: np.ndarray  # uint8 (T, H, W, 3)
    psnr: list[float]
    ssim: list[float]


def scored(name: str, original: np.ndarray, frames: np.ndarray) -> Reconstruction:
    """Per-frame PSNR and SSIM (cmvae.metrics, the authors' SSIM) of a reconstruction."""
    if len(frames) != len(original) or frames.shape[1:] != original.shape[1:]:
        raise ValueError(f"{name}: {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, the original has "
                         f"{len(original)} of {original.shape[2]}x{original.shape[1]}")
    psnr = [frame_psnr(a, b) for a, b in zip(original, frames, strict=True)]
    ssim = [frame_ssim(a, b) for a, b in zip(original, frames, strict=True)]
    return Reconstruction(name, frames, psnr, ssim)


def difference_frames(original: np.ndarray, frames: np.ndarray, gain: float = DIFFERENCE_GAIN) -> np.ndarray:
    """|original - reconstruction|, averaged over colours, times `gain`, as a heat map (uint8 RGB)."""
    from .attention_maps import heat_colours

    difference = np.abs(original.astype(np.float32) - frames.astype(np.float32)).mean(axis=-1) / 255.0
    return heat_colours(np.clip(difference * gain, 0.0, 1.0))


def _page_size(height: int, width: int) -> tuple[int, int]:
    """Even sides (4:2:0), at most MAX_HEIGHT tall, keeping the aspect ratio."""
    scale = min(1.0, MAX_HEIGHT / height)
    return max(2, round(height * scale / 2) * 2), max(2, round(width * scale / 2) * 2)


def mp4_bytes(frames: np.ndarray, fps: Fraction, crf: int) -> bytes:
    """H.264 (yuv420p) mp4 of uint8 frames, a keyframe every 12 frames so that seeking is quick."""
    height, width = _page_size(*frames.shape[1:3])
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = 12
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if (frame.shape[0], frame.shape[1]) != (height, width):
                picture = picture.reformat(width=width, height=height, interpolation="AREA")
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _data_uri(kind: str, data: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def worst_frames(reconstruction: Reconstruction, count: int = 5) -> list[int]:
    """Frames of lowest PSNR, worst first."""
    order = sorted(range(len(reconstruction.psnr)), key=lambda k: (reconstruction.psnr[k], k))
    return order[:count]


def page_html(original: np.ndarray, reconstructions: list[Reconstruction], fps: Fraction, title: str,
              attention: list[tuple[str, bytes]] | None = None, crf: int | None = None) -> str:
    """The page, with its videos encoded at the first crf of CRF_STEPS (or `crf`) that keeps it within
    PAGE_LIMIT."""
    for step in ([crf] if crf is not None else CRF_STEPS):
        videos = {"original": mp4_bytes(original, fps, step)}
        for index, item in enumerate(reconstructions):
            videos[f"model{index}"] = mp4_bytes(item.frames, fps, step)
            videos[f"diff{index}"] = mp4_bytes(difference_frames(original, item.frames), fps, step)
        page = _render(videos, original, reconstructions, fps, title, attention or [], step)
        if len(page) <= PAGE_LIMIT:
            return page
    raise ValueError(f"the page would take {len(page) / 2**20:.0f} MB even at crf {step}, above the "
                     f"{PAGE_LIMIT / 2**20:.0f} MB limit; view fewer frames (--max-frames)")


def _render(videos: dict[str, bytes], original: np.ndarray, reconstructions: list[Reconstruction],
            fps: Fraction, title: str, attention: list[tuple[str, bytes]], crf: int) -> str:
    data = {
        "fps": float(fps), "frames": len(original),
        "models": [{"name": r.name, "psnr": _finite(r.psnr), "ssim": _finite(r.ssim),
                    "worst": worst_frames(r)} for r in reconstructions],
    }
    columns = [_column("original", videos["original"], None)]
    for index, item in enumerate(reconstructions):
        columns.append(_column(item.name, videos[f"model{index}"], videos[f"diff{index}"]))
    figures = "".join(f'<figure><img src="{_data_uri("image/png", png)}" alt="{html.escape(label)}">'
                      f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, png in attention)
    attention_html = f'<h2>Attention overlays</h2><div class="attention">{figures}</div>' if attention else ""
    height, width = _page_size(*original.shape[1:3])
    return _PAGE.format(
        title=html.escape(title), columns="".join(columns), attention=attention_html,
        data=json.dumps(data).replace("</", "<\\/"), last=len(original) - 1,
        info=html.escape(f"{len(original)} frames of {original.shape[2]}x{original.shape[1]} at {float(fps):g} fps; "
                         f"shown at {width}x{height}, H.264 crf {crf}; difference heat map x{DIFFERENCE_GAIN:g}"),
    )


def _column(name: str, video: bytes, difference: bytes | None) -> str:
    """The video's column, and its difference heat map's column beside it."""
    label = html.escape(name)
    parts = [f'<div class="column"><h3>{label}</h3><video class="clip" muted playsinline preload="auto" '
             f'data-name="{label}" src="{_data_uri("video/mp4", video)}"></video></div>']
    if difference is not None:
        parts.append(f'<div class="column"><h3>{label}: difference</h3><video class="clip difference" muted '
                     f'playsinline preload="auto" data-name="{label} difference" '
                     f'src="{_data_uri("video/mp4", difference)}"></video></div>')
    return "".join(parts)


def read_attention_pictures(folder: str | Path) -> list[tuple[str, bytes]]:
    """The overlay PNGs `cmvae attention` wrote into a folder, labelled by their names."""
    folder = Path(folder)
    pictures = sorted(folder.glob("encoder_*.png")) + sorted(folder.glob("decoder_*.png"))
    if not pictures:
        raise ValueError(f"no attention overlays (encoder_*.png, decoder_*.png) in {folder}; make them with "
                         "`cmvae attention`")
    return [(p.stem.replace("_", ": ", 1), p.read_bytes()) for p in pictures]


def write_page(target: str | Path, original: np.ndarray, reconstructions: dict[str, np.ndarray], fps: Fraction,
               title: str = "cmvae viewer", attention: list[tuple[str, bytes]] | None = None) -> Path:
    """Score the reconstructions and write the page to `target` (atomically)."""
    items = [scored(name, original, frames) for name, frames in reconstructions.items()]
    page = page_html(original, items, fps, title, attention)
    with atomic_path(target) as temp:
        temp.write_text(page, encoding="utf-8")
    return Path(target)


def write_file_page(target: str | Path, original: str | Path, reconstructions: list[str | Path],
                    max_frames: int | None = None, attention: list[tuple[str, bytes]] | None = None,
                    resize=None, stretch: bool = False) -> Path:
    """The page for video files: an original and its reconstructions, each named by its file's name.
    `resize`/`stretch` as the pipeline's: the original is resized like the reconstructions were."""
    from .files import refuse_overwriting_input
    from .video_io import probe, read_video

    for path in [original, *reconstructions]:
        refuse_overwriting_input(target, path)
    frames = read_video(original, max_frames)
    if resize is not None:
        from .pipeline import resize_frames, to_tensor, to_uint8, to_unit

        frames = to_uint8(to_unit(resize_frames(to_tensor(frames), resize, stretch)))
    named: dict[str, np.ndarray] = {}
    for path in reconstructions:
        name = Path(path).stem if Path(path).stem not in named else str(path)
        named[name] = read_video(path, max_frames)
    return write_page(target, frames, named, probe(original).fps, f"cmvae: {Path(original).name}", attention)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px sans-serif; margin: 16px; background: #fafafa; color: #222; }}
.row {{ display: flex; gap: 12px; align-items: flex-start; overflow-x: auto; }}
.column {{ display: flex; flex-direction: column; gap: 4px; }}
.column h3 {{ margin: 0; font-size: 14px; }}
video {{ width: 320px; background: #000; }}
.note {{ color: #666; font-size: 12px; }}
.controls {{ margin: 12px 0; display: flex; gap: 12px; align-items: center; }}
#slider {{ width: 480px; }}
svg.chart {{ background: #fff; border: 1px solid #ccc; cursor: crosshair; }}
.attention {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.attention img {{ max-width: 320px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; }}
a.frame {{ cursor: pointer; color: #06c; }}
</style></head>
<body>
<h1>{title}</h1>
<p class="note">{info}</p>
<div class="row">{columns}</div>
<div class="controls">
  <button id="play">play</button>
  <input id="slider" type="range" min="0" max="{last}" value="0" step="1">
  <span id="frame-label">frame 0</span>
</div>
<h2>Per-frame scores</h2>
<div>PSNR (dB)</div><svg id="psnr-chart" class="chart" width="720" height="160"></svg>
<div>SSIM</div><svg id="ssim-chart" class="chart" width="720" height="160"></svg>
<h2>Worst frames (lowest PSNR)</h2>
<table id="worst"></table>
{attention}
<script id="viewer-data" type="application/json">{data}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const videos = Array.from(document.querySelectorAll("video.clip"));
  const master = videos[0];
  const slider = document.getElementById("slider");
  const label = document.getElementById("frame-label");
  const colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
  let current = 0;

  function show(k) {{
    current = k;
    slider.value = k;
    label.textContent = "frame " + k;
    document.querySelectorAll("line.cursor").forEach(l => {{
      const x = xOf(k, l.ownerSVGElement); l.setAttribute("x1", x); l.setAttribute("x2", x);
    }});
  }}
  function seek(k) {{
    k = Math.max(0, Math.min(data.frames - 1, Math.round(k)));
    videos.forEach(v => {{ v.pause(); v.currentTime = (k + 0.5) / data.fps; }});
    document.getElementById("play").textContent = "play";
    show(k);
  }}
  function xOf(k, svg) {{
    const w = svg.width.baseVal.value;
    return 30 + (data.frames > 1 ? k / (data.frames - 1) : 0) * (w - 40);
  }}
  function frameAt(x, svg) {{
    const w = svg.width.baseVal.value;
    return (x - 30) / (w - 40) * (data.frames - 1);
  }}
  function chart(id, key) {{
    const svg = document.getElementById(id), ns = "http://www.w3.org/2000/svg";
    const h = svg.height.baseVal.value;
    const values = data.models.flatMap(m => m[key]).filter(v => v !== null);
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!(hi > lo)) {{ lo -= 1; hi += 1; }}
    const y = v => h - 20 - (v - lo) / (hi - lo) * (h - 30);
    data.models.forEach((m, i) => {{
      const points = m[key].map((v, k) => v === null ? null : xOf(k, svg) + "," + y(v)).filter(p => p);
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("fill", "none"); line.setAttribute("stroke", colours[i % colours.length]);
      svg.appendChild(line);
      const name = document.createElementNS(ns, "text");
      name.setAttribute("x", 34 + 120 * i); name.setAttribute("y", 12); name.setAttribute("font-size", "11");
      name.setAttribute("fill", colours[i % colours.length]); name.textContent = m.name;
      svg.appendChild(name);
    }});
    [[lo, h - 20], [hi, 10]].forEach(([v, at]) => {{
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", 0); t.setAttribute("y", at + 4); t.setAttribute("font-size", "10");
      t.textContent = key === "psnr" ? v.toFixed(1) : v.toFixed(3); svg.appendChild(t);
    }});
    const cursor = document.createElementNS(ns, "line");
    cursor.setAttribute("class", "cursor"); cursor.setAttribute("y1", 0); cursor.setAttribute("y2", h);
    cursor.setAttribute("stroke", "#000"); cursor.setAttribute("stroke-dasharray", "3,3");
    svg.appendChild(cursor);
    svg.addEventListener("click", e => {{
      const box = svg.getBoundingClientRect();
      seek(frameAt(e.clientX - box.left, svg));
    }});
  }}
  chart("psnr-chart", "psnr");
  chart("ssim-chart", "ssim");

  const table = document.getElementById("worst");
  table.innerHTML = "<tr><th>model</th><th>frame</th><th>PSNR</th><th>SSIM</th></tr>";
  data.models.forEach(m => m.worst.forEach(k => {{
    const row = table.insertRow();
    row.insertCell().textContent = m.name;
    const cell = row.insertCell(), link = document.createElement("a");
    link.className = "frame"; link.textContent = k; link.addEventListener("click", () => seek(k));
    cell.appendChild(link);
    row.insertCell().textContent = m.psnr[k] === null ? "inf" : m.psnr[k].toFixed(2);
    row.insertCell().textContent = m.ssim[k] === null ? "-" : m.ssim[k].toFixed(4);
  }}));

  slider.addEventListener("input", () => seek(Number(slider.value)));
  document.getElementById("play").addEventListener("click", e => {{
    if (master.paused) {{
      if (master.ended || current >= data.frames - 1) seek(0);
      videos.forEach(v => {{ v.currentTime = master.currentTime; v.play(); }});
      e.target.textContent = "pause";
    }} else {{
      videos.forEach(v => v.pause());
      e.target.textContent = "play";
    }}
  }});
  function follow() {{
    if (!master.paused) {{
      const k = Math.min(data.frames - 1, Math.floor(master.currentTime * data.fps));
      if (k !== current) show(k);
      videos.slice(1).forEach(v => {{
        if (Math.abs(v.currentTime - master.currentTime) > 0.5 / data.fps) v.currentTime = master.currentTime;
      }});
    }}
    requestAnimationFrame(follow);
  }}
  requestAnimationFrame(follow);
  master.addEventListener("ended", () => {{ videos.forEach(v => v.pause());
    document.getElementById("play").textContent = "play"; }});
  window.cmvaeViewer = {{ seek: seek, videos: videos, data: data }};
  videos.forEach(v => v.addEventListener("loadeddata", () => {{ if (!v.seekedOnce) {{ v.seekedOnce = true;
    v.currentTime = (current + 0.5) / data.fps; }} }}));
}})();
</script>
</body></html>
"""
