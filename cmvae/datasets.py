"""Lists of media with captions: a folder, a file list, a CSV or a JSONL file.

- folder: every video and image in it (sorted), the caption from a same-name `.txt` beside it;
- `.txt` list: one path per line;
- `.csv` (with a header) or `.jsonl`: a path column (`path`, `video`, `file`, `filepath`, `image`)
  and an optional caption column (`caption`, `text`, `name`, `prompt`; `name` is WebVid's).

Relative paths are resolved against the list file's folder.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .video_io import list_media

PATH_COLUMNS = ("path", "video", "file", "filepath", "image", "video_path")
CAPTION_COLUMNS = ("caption", "text", "name", "prompt")


@dataclass(frozen=True)
class MediaItem:
    index: int  # position in the sorted listing: stable across runs of the same listing
    path: Path
    caption: str


def caption_beside(path: Path) -> str:
    """The caption in a same-name `.txt` file beside a video, or the empty caption."""
    text_file = path.with_suffix(".txt")
    if not text_file.is_file():
        return ""
    try:
        return text_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the caption file {text_file} is not UTF-8 text; convert it (iconv -t utf-8)") from None


def list_items(source: str | os.PathLike) -> list[MediaItem]:
    """The items of a folder or list, with their captions (recorded with the latents even for a model that
    takes no text: diffusion training reads them)."""
    source = Path(source)
    if source.is_dir():
        return [MediaItem(i, p, caption_beside(p)) for i, p in enumerate(list_media(source))]
    if not source.is_file():
        raise ValueError(f"dataset not found: {source} (expected a folder, or a .txt, .csv or .jsonl list)")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        with source.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".jsonl", ".json"):
        rows = _json_lines(source)
    elif suffix in (".txt", ".lst", ".list"):
        rows = [{"path": line.strip()} for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"{source}: unknown list format; use a folder, or a .txt, .csv or .jsonl file")
    return _items_from_rows(rows, source)


def _json_lines(source: Path) -> list[dict]:
    """One JSON object a line (blank lines skipped), each checked, so that a bad line is named."""
    rows = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source} line {number}: expected an object such as {{\"path\": \"clip.mp4\", "
                             f"\"caption\": \"...\"}}, got {type(row).__name__} {line.strip()[:40]}")
        rows.append(row)
    return rows


def _items_from_rows(rows: list[dict], source: Path) -> list[MediaItem]:
    if not rows:
        raise ValueError(f"{source} lists no items")
    columns = list(rows[0])
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise ValueError(f"{source}: no path column; expected one of {', '.join(PATH_COLUMNS)}, found "
                         f"{', '.join(columns)}")
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    items = []
    for index, row in enumerate(rows):
        value = row.get(path_column)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{source}: item {index + 1} has no {path_column} (a file name), got {value!r}")
        path = Path(value.strip())
        path = path if path.is_absolute() else source.parent / path
        caption = str(row.get(caption_column) or "") if caption_column else caption_beside(path)
        items.append(MediaItem(index, path, caption))
    return items
