"""Self-contained HTML contact sheets: each query beside its neighbours, as thumbnails."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

THUMB = 160


def thumbnail_jpeg(file: str, size: int = THUMB) -> bytes | None:
    """A JPEG of an image file (or archive member) within size x size, or None when it cannot be read."""
    from .images import ImageDecodeError, decode_image

    try:
        img = decode_image(file, draft_size=size).image
    except ImageDecodeError:
        return None
    img = img.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def thumbnail_data_uri(file: str, size: int = THUMB) -> str | None:
    """A small inline JPEG of an image file, or None when it cannot be read."""
    data = thumbnail_jpeg(file, size)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _figure(file: str | None, caption: str, css: str = "") -> str:
    uri = thumbnail_data_uri(file) if file else None
    img = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else '<div class="missing">no preview</div>'
    title = html.escape(file or "")
    return f'<figure class="{css}" title="{title}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


def write_sheet(out: str | os.PathLike, rows: list[tuple[str, str | None, list[tuple[str, str]]]], title: str) -> Path:
    """Write an HTML page with one row per query.

    Args:
        out: output .html path.
        rows: (query caption, query image file or None, [(neighbour file, caption), ...]).
        title: page title.
    """
    body = []
    for caption, qfile, neighbours in rows:
        cells = [_figure(qfile, caption, "query")] + [_figure(f, c) for f, c in neighbours]
        body.append(f'<section class="row">{"".join(cells)}</section>')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em; background: #fafafa; }}
.row {{ display: flex; gap: 8px; align-items: flex-start; padding: 8px 0; border-bottom: 1px solid #ddd; overflow-x: auto; }}
figure {{ margin: 0; width: {THUMB}px; flex: none; }}
figure img {{ max-width: {THUMB}px; max-height: {THUMB}px; display: block; }}
figure.query {{ outline: 3px solid #3a7; outline-offset: 2px; }}
figcaption {{ font-size: 12px; word-break: break-all; }}
.missing {{ width: {THUMB}px; height: {THUMB // 2}px; background: #eee; color: #999; display: flex; align-items: center; justify-content: center; }}
</style></head><body><h1>{html.escape(title)}</h1>
{"".join(body)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
