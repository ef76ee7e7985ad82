"""Finding and decoding images: the only module that touches PIL.

`list_images` turns the user's inputs (directories, .tar archives, or text/CSV/Parquet files
listing paths) into a sorted, deterministic list of `ImageRecord`s. `decode_image` opens one
file robustly: EXIF orientation applied, every mode converted to 8-bit RGB, the first
frame of animations, a configurable decompression-bomb limit, and JPEG decoding at a
reduced scale when the model wants far fewer pixels than the file holds. With `as_array`,
plain JPEGs go straight from libjpeg-turbo (simplejpeg) into a NumPy array: PIL's exact
pixels, without PIL's RGBX buffer and the copy out of it.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import archives
from ._arrow import read_table
from .errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
     ".avif", ".heic", ".heif"}
)
#: what to do about files a directory walk leaves out (said with describe_ignored's count)
IGNORED_HINT = "list such files in a .txt file to embed them anyway"
#: decoded through the pillow-heif plugin (phone photos); without it they are recorded as errors
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})

log = logging.getLogger(__name__)

#: Default decompression-bomb limit, in pixels (PIL's own default is ~89 Mpx and only warns).
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class ImageRecord:
    """One input image.

    Attributes:
        row_id: position in the sorted listing; stable across reruns of the same input.
        path: what is written to the shards (relative to `root` for directory inputs,
            absolute for list-file inputs).
        file: absolute path on disk.
        label: class label (parent folder name or list-file column), or None.
    """

    row_id: int
    path: str
    file: str
    label: str | None


@dataclass(frozen=True)
class ImageListing:
    """The resolved input: records plus the root that relative paths hang from."""

    records: list[ImageRecord]
    root: str | None
    # files in the input directories left out because their extension is not an image one,
    # counted by lower-case extension ("" for none); hidden files and folders are not counted
    ignored: dict[str, int] = field(default_factory=dict)
    # folders of the input directories that were not walked, and why (a symlink loop, unreadable):
    # {folder path: reason}; also said in a warning
    skipped_dirs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to RGB, with the size of the original file."""

    image: "object"  # PIL.Image.Image, or an (H, W, 3) uint8 ndarray with as_array; typed loosely
    # so that importing this module stays cheap
    width: int
    height: int


class ImageDecodeError(Exception):
    """One image could not be decoded. `kind` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def list_images(inputs: list[str | os.PathLike], labels: str = "folder", progress: bool = False) -> ImageListing:
    """Resolve inputs into a deterministic, sorted list of image records.

    Args:
        inputs: image directories (walked recursively, symlinks followed), uncompressed `.tar`
            archives (WebDataset shards, …: their image members are read in place and named
            `<archive>/<member>`, relative to the root like files in a folder), image files
            (stored with absolute paths), or list files:
            `.txt` (one path per line), `.csv` / `.parquet` (a `path` column and an optional
            `label` column). Relative paths in list files are resolved against the list
            file's folder.
        labels: `folder` (label = name of the parent directory, like torchvision's
            ImageFolder; in archives the WebDataset `.cls` file of the same key comes first)
            or `none`.
        progress: count the images found on stderr when listing takes more than a second
            (3.5 us an image here from a folder, 21 from an archive: `benchmarks/bench_archive.py`).

    Returns:
        An `ImageListing` whose records are sorted by path, with row ids 0..N-1.
    """
    if labels not in ("folder", "none"):
        raise InputError(f"--labels must be 'folder' or 'none', not {labels!r}.")
    if not inputs:
        raise InputError("No input given: pass at least one image directory or list file.")
    dirs: list[Path] = []
    tars: list[Path] = []
    listed: list[tuple[str, str, str | None]] = []  # (path, file, label)
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            dirs.append(p.resolve())
        elif p.is_file() and archives.is_tar(p):
            tars.append(p.resolve())
        elif archives.is_compressed_tar(p):
            raise InputError(f"{str(raw)!r} is a compressed tar archive: embedx reads images in place from "
                             "uncompressed .tar files only. Unpack it to a .tar (e.g. `gunzip`) or a folder.")
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            f = str(p.resolve())
            listed.append((f, f, p.resolve().parent.name if labels == "folder" else None))
        elif p.is_file():
            listed.extend(_read_list_file(p, labels))
        elif p.suffix.lower() in IMAGE_EXTENSIONS and (member := archives.split(os.path.abspath(p))):
            tar, name = member  # one image inside an archive, named like the rows of an extract over it
            if not archives.has_member(tar, name):
                raise InputError(f"Input {str(raw)!r}: the archive {tar} has no member {name!r}.")
            f = os.path.abspath(p)
            listed.append((f, f, archives.member_label(tar, name) if labels == "folder" else None))
        else:
            raise InputError(
                f"Input {str(raw)!r} does not exist. Pass an image directory, an image, a .tar archive "
                "or a .txt/.csv/.parquet file that lists image paths."
            )
    root: str | None = None
    entries: list[tuple[str, str, str | None]] = list(listed)
    ignored: Counter = Counter()
    skipped: dict[str, str] = {}
    if dirs or tars:
        from ._progress import progress_bar

        tops = dirs + [t.parent for t in tars]
        root_path = Path(os.path.commonpath(tops)) if len(tops) > 1 else tops[0]
        root = str(root_path)
        with progress_bar(desc="listing", unit="img", enabled=progress, leave=False, delay=1.0) as bar:
            for d in dirs:
                top = str(d)
                for dirpath, names in _walk(d, ignored, bar, skipped):
                    # paths as strings, made once a folder (pathlib objects per file: listing 50k images
                    # took 2.7-3.4 s on the H200 machine's Python 3.12, beside ~11 s embedding them)
                    rel_dir = Path(dirpath).relative_to(root_path).as_posix()
                    prefix = "" if rel_dir == "." else rel_dir + "/"
                    label = os.path.basename(dirpath) if labels == "folder" and dirpath != top else None
                    entries.extend((prefix + name, os.path.join(dirpath, name), label) for name in names)
            for t in tars:
                found, left_out = archives.list_archive(str(t), IMAGE_EXTENSIONS, labels == "folder")
                ignored.update(left_out)
                rel = t.relative_to(root_path).as_posix()
                entries.extend((f"{rel}/{name}", f"{t}/{name}", label) for name, label in found)
                bar.update(len(found))
    seen: dict[str, tuple[str, str, str | None]] = {}
    for e in entries:
        seen.setdefault(e[0], e)  # an image listed twice is embedded once
    ordered = sorted(seen.values(), key=lambda e: e[0])
    records = [ImageRecord(i, path, file, label) for i, (path, file, label) in enumerate(ordered)]
    if not records:
        raise InputError(
            "No images found in " + ", ".join(map(str, inputs)) + " (looked for "
            + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")."
            + (f" Left out: {describe_ignored(dict(ignored))}; {ignored_advice(dict(ignored))}." if ignored else "")
            + (f" {describe_skipped(skipped)}." if skipped else "")
        )
    if skipped:
        log.warning("%s; their images are not in this run.", describe_skipped(skipped))
    return ImageListing(records=records, root=root, ignored=dict(sorted(ignored.items())),
                        skipped_dirs=dict(sorted(skipped.items())))


def describe_skipped(skipped: dict[str, str], limit: int = 5) -> str:
    """'Skipped 2 folders: a/up (symlink loop: ...); b (cannot be read (...))', the first `limit`."""
    items = sorted(skipped.items())
    text = "; ".join(f"{path} ({why})" for path, why in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return f"Skipped {len(items)} folder{'s' if len(items) != 1 else ''}: {text}{more}"


def ignored_advice(ignored: dict[str, int]) -> str:
    """What to do about the files a directory walk left out (`IGNORED_HINT`, and for .tar files
    that archives are read when given as inputs)."""
    if archives.TAR_SUFFIX not in ignored:
        return IGNORED_HINT
    tar_hint = "pass .tar archives themselves as inputs to embed the images in them"
    return tar_hint if len(ignored) == 1 else f"{tar_hint}; for the other files, {IGNORED_HINT}"


def describe_ignored(ignored: dict[str, int]) -> str:
    """'3 files (.txt: 2, no extension: 1)', most frequent first."""
    kinds = sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))
    parts = [f"{ext or 'no extension'}: {n}" for ext, n in kinds[:6]]
    if len(kinds) > 6:
        parts.append(f"{len(kinds) - 6} other extensions")
    total = sum(ignored.values())
    return f"{total} file{'s' if total != 1 else ''} ({', '.join(parts)})"


def _walk(directory: Path, ignored: Counter | None = None, bar=None,
          skipped: dict[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """The image files under `directory`, as (folder, [file names]) per folder, symlinks followed
    (like torchvision's ImageFolder and timm's folder reader), hidden files and folders left out. Two kinds of folder are skipped and
    said why in `skipped` (folder -> reason): a symlink back to a folder the walk is inside
    already (a loop: `os.walk` would go round it until the paths got too long), and a folder that
    cannot be read (`os.walk` drops those without a word)."""
    found = []
    chain: dict[str, frozenset] = {}  # folder being walked -> identities of it and its ancestors

    def identity(path: str):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def unreadable(e: OSError) -> None:
        if skipped is not None:
            skipped[e.filename or str(directory)] = f"cannot be read ({type(e).__name__}: {e.strerror or e})"

    try:
        chain[str(directory)] = frozenset([identity(str(directory))])
    except OSError as e:
        unreadable(e)
        return found
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True, onerror=unreadable):
        ancestors = chain.pop(dirpath, frozenset())
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            sub = os.path.join(dirpath, d)
            try:
                ident = identity(sub)
            except OSError as e:
                unreadable(e)
                continue
            if ident in ancestors:
                if skipped is not None:
                    skipped[sub] = f"symlink loop: it leads back to {os.path.realpath(sub)}, which contains it"
                continue
            chain[sub] = ancestors | {ident}
            kept.append(d)
        dirnames[:] = kept
        images = []
        for name in filenames:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(name)
            elif ignored is not None:
                ignored[ext] += 1
        if images:
            found.append((dirpath, images))
        if bar is not None:
            bar.update(len(images))
    return found


def _read_list_file(path: Path, labels: str) -> list[tuple[str, str, str | None]]:
    suffix = path.suffix.lower()
    base = path.resolve().parent
    rows: list[tuple[str, str | None]]
    if suffix == ".txt" or suffix == ".lst":
        with open(path, encoding="utf-8-sig") as fh:
            rows = [(line.strip(), None) for line in fh if line.strip() and not line.startswith("#")]
    elif suffix == ".csv":
        # utf-8-sig: spreadsheets and Notepad start UTF-8 files with a byte-order mark, which would
        # otherwise stick to the first header (or, in a .txt list, to the first path)
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is not None:  # "Path, Label" is meant as path,label
                reader.fieldnames = [(f or "").strip().lower() for f in reader.fieldnames]
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                found = f" (its header: {', '.join(reader.fieldnames)})" if reader.fieldnames else ""
                raise InputError(f"{path}: a CSV list needs a 'path' column (and optionally 'label'){found}.")
            rows = [(r["path"].strip(), (r.get("label") or "").strip() or None) for r in reader if (r["path"] or "").strip()]
    elif suffix == ".parquet":
        table = read_table(path)
        if "path" not in table.column_names:
            raise InputError(f"{path}: a Parquet list needs a 'path' column (and optionally 'label').")
        paths = table.column("path").to_pylist()
        labs = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        rows = [(p, None if lab is None else str(lab)) for p, lab in zip(paths, labs)]
    else:
        raise InputError(
            f"{path} is a file but not an image list: list files end in .txt, .csv or .parquet."
        )
    out = []
    for p, lab in rows:
        f = Path(p).expanduser()
        f = f if f.is_absolute() else base / f
        f = Path(os.path.abspath(f))
        if labels == "folder" and lab is None:
            member = archives.split(str(f)) if f".tar{os.sep}" in str(f).lower() else None
            if member and archives.has_member(*member):  # labelled as in the archive
                lab = archives.member_label(*member)
            else:
                lab = f.parent.name
        elif labels == "none":
            lab = None
        out.append((str(f), str(f), lab))
    return out


def decode_image(file: str, draft_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 as_array: bool = False) -> DecodedImage:
    """Decode one image file to 8-bit RGB.

    Args:
        file: path on disk, or a path through an uncompressed .tar archive to one of its
            members (`shards/000.tar/a/b.jpg`; see `embedx.archives`).
        draft_size: if set, JPEGs are decoded at the smallest DCT scale whose both sides
            are still >= this many pixels (PIL `draft`): far less work for a 224 px model.
        max_pixels: refuse images with more pixels than this (decompression bombs);
            None disables the check.
        as_array: return the pixels as a writable (H, W, 3) uint8 ndarray instead of a PIL
            image. Plain JPEGs (RGB or greyscale, upright) are then decoded by simplejpeg,
            the same libjpeg-turbo as PIL's with the same settings and DCT scale: the same
            pixels (tested), ~40 % less time. Anything it declines goes the PIL way.

    Raises:
        ImageDecodeError: with `kind` one of `missing`, `unreadable`, `empty`, `not_an_image`,
            `unsupported_format` (HEIC/HEIF without the pillow-heif plugin), `too_large`,
            `truncated`, `decode_error`.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    # PIL's own check (process-wide: it guards every PIL user here) raises DecompressionBombError
    # at twice Image.MAX_IMAGE_PIXELS. Ours (_check_pixels) refuses at max_pixels itself, so PIL's
    # limit is only ever raised to let a larger max_pixels through, never lowered: a low limit
    # for embedx would otherwise leak into every later PIL call in the process.
    if Image.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = max_pixels

    source = _open_source(file)
    # registers pillow-heif's opener with PIL the first time a HEIC/HEIF file comes by
    heif_problem = _heif_problem() if os.path.splitext(file)[1].lower() in HEIF_EXTENSIONS else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on palette transparency, EXIF oddities, …
            with Image.open(source) as im:
                width, height = im.size
                _check_pixels(width, height, max_pixels)
                # EXIF orientation swaps the sides for 90° rotations: report the upright size.
                orientation = _exif_orientation(im)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                upright_jpeg = im.format == "JPEG" and orientation in (None, 1)
                if draft_size and upright_jpeg:
                    im.draft("RGB", (draft_size, draft_size))  # sets the DCT scale; im.size is now the decoded size
                if as_array and upright_jpeg and im.mode in ("RGB", "L"):
                    arr = _turbo_decode(im.fp, im.size)  # the file PIL already has open
                    if arr is not None:
                        return DecodedImage(arr, width, height)
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                img = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
                rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        if heif_problem:
            raise ImageDecodeError("unsupported_format", f"HEIC/HEIF images need the pillow-heif plugin "
                                   f"({heif_problem}): pip install pillow-heif, or 'embedx[heif]'") from None
        raise ImageDecodeError("not_an_image", "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("too_large", str(e)) from None
    except PermissionError as e:
        raise ImageDecodeError("unreadable", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        kind = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise ImageDecodeError(kind, f"{type(e).__name__}: {e}") from None
    if as_array:
        import numpy as np

        return DecodedImage(np.array(rgb, dtype=np.uint8), width, height)
    return DecodedImage(rgb, width, height)


_simplejpeg = None  # the module, False once its import failed


@functools.lru_cache(maxsize=None)
def _heif_problem() -> str | None:
    """Register pillow-heif's opener with PIL (once a process); None if it worked, else why not."""
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError as e:
        return f"not installed: {e}"
    except Exception as e:  # noqa: BLE001 - e.g. a libheif that fails to load
        return f"failed to load: {type(e).__name__}: {e}"
    return None


def jpeg_decoder() -> str:
    """Which library decodes plain JPEGs on the array path: "simplejpeg X.Y.Z" or "PIL"."""
    sj = _load_simplejpeg()
    return f"simplejpeg {sj.__version__}" if sj else "PIL"


def use_simplejpeg(enabled: bool) -> None:
    """Turn the simplejpeg path on (the default, where it is installed) or off for this process:
    off, PIL decodes every JPEG (the same pixels, slower), e.g. to compare the two or to rule
    simplejpeg out. Decoder worker processes forked afterwards inherit the choice."""
    global _simplejpeg
    _simplejpeg = None if enabled else False


def _load_simplejpeg():
    """The simplejpeg module, or False (once said why) when it is not installed."""
    global _simplejpeg
    if _simplejpeg is None:
        try:
            import simplejpeg

            _simplejpeg = simplejpeg
        except ImportError:
            _simplejpeg = False
            log.warning("simplejpeg is not installed: JPEGs are decoded by PIL (same pixels, slower). "
                        "`pip install simplejpeg` for the faster path.")
    return _simplejpeg


def _turbo_decode(fp, size: tuple[int, int]):
    """A JPEG's RGB pixels from simplejpeg at `size` (PIL's decoded size: the DCT scale its `draft`
    picked, or the full size), or None for whatever it declines (libjpeg warnings are errors in
    strict mode; PIL then decodes, or classifies the failure). `fp`: the JPEG file, open in
    binary mode (read from its start; PIL's own loader seeks where it needs afterwards)."""
    sj = _load_simplejpeg()
    if not sj:
        return None
    w, h = size
    try:
        fp.seek(0)
        data = fp.read()
        # the smallest DCT scale whose output is at least (h, w) is exactly PIL's scale
        arr = sj.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w, strict=True)
    except Exception:  # noqa: BLE001 - PIL decodes, or classifies, whatever simplejpeg declines
        return None
    return arr if arr.shape[:2] == (h, w) else None


def _open_source(file: str):
    """What PIL opens for `file`: the path itself, or the bytes (BytesIO) of the tar archive member
    that it names (`…/000.tar/a/b.jpg`). Missing, unreadable and zero-byte files are refused here,
    before any decoder sees them."""
    try:
        size = os.path.getsize(file)
    except (FileNotFoundError, NotADirectoryError):
        try:
            data = archives.read_member(file)
        except KeyError as e:
            raise ImageDecodeError("missing", str(e.args[0])) from None
        except (OSError, InputError) as e:
            raise ImageDecodeError("unreadable", str(e)) from None
        if data is None:
            raise ImageDecodeError("missing", "file not found") from None
        if not data:
            raise ImageDecodeError("empty", "zero-byte archive member")
        return io.BytesIO(data)
    except OSError as e:
        raise ImageDecodeError("unreadable", str(e)) from None
    if size == 0:
        raise ImageDecodeError("empty", "zero-byte file")
    return file


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (raise it with --max-pixels)",
        )


def read_jpeg_bytes(file: str, max_pixels: int | None = DEFAULT_MAX_PIXELS):
    """The whole file as a uint8 array if it is a JPEG within the pixel limit (checked from the
    header alone), for decoding elsewhere (`--decode device`); None for other formats and for
    files PIL cannot identify, which `decode_image` then classifies.

    Raises:
        ImageDecodeError: `missing`, `unreadable`, `empty` or `too_large`.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    source = _open_source(file)
    try:
        with Image.open(source) as im:  # reads the header only
            if im.format != "JPEG":
                return None
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    _check_pixels(width, height, max_pixels)
    if isinstance(source, io.BytesIO):  # an archive member
        return np.frombuffer(bytearray(source.getbuffer()), dtype=np.uint8)
    return np.fromfile(file, dtype=np.uint8)


def _exif_orientation(im) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return None


def _to_rgb(img):
    """Convert any PIL mode to 8-bit RGB; transparent areas are composited on white."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
