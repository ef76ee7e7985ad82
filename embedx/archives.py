"""Images inside tar archives (WebDataset shards, ImageNet-style class tars), read in place.

A member is named by a path that goes *through* its archive: `/data/shards/000.tar/img/1.jpg`
is the member `img/1.jpg` of `/data/shards/000.tar`. Such paths travel through embedx like
any other file path (records, shards, search results, contact sheets); `read_member` finds
the bytes with one seek, from an index of the archive's members built once per process.
Only uncompressed `.tar` files can be read this way: a compressed archive has no offsets
to seek to.
"""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile
from dataclasses import dataclass

from .errors import InputError

TAR_SUFFIX = ".tar"
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
#: WebDataset's class-label sidecar: `000123.cls` holds the label of `000123.jpg`
LABEL_SUFFIX = ".cls"


@dataclass(frozen=True)
class Member:
    """One regular file in an archive: its normalised name and where its bytes lie."""

    name: str
    offset: int
    size: int


def is_tar(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TAR_SUFFIX)


def is_compressed_tar(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(COMPRESSED_TAR_SUFFIXES)


def members(tar: str | os.PathLike) -> dict[str, Member]:
    """The regular files of an uncompressed tar archive, by normalised name (`./a/b.jpg` -> `a/b.jpg`).

    Cached per process and per archive version (path, size, mtime): decoder processes read
    the headers once, not once an image.

    Raises:
        InputError: the file is not an uncompressed tar archive.
    """
    st = os.stat(tar)
    return _members(os.path.abspath(tar), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _members(tar: str, _size: int, _mtime_ns: int) -> dict[str, Member]:
    try:
        with tarfile.open(tar, mode="r:") as tf:
            found = {}
            for m in tf:  # headers only: tarfile seeks over the data
                if m.isfile():
                    name = posixpath.normpath(m.name.lstrip("/"))
                    found[name] = Member(name, m.offset_data, m.size)
            return found
    except tarfile.ReadError as e:
        raise InputError(
            f"{tar} is not an uncompressed tar archive ({e}). A compressed archive has to be "
            "unpacked to a .tar (e.g. `gunzip shard.tar.gz`) or a folder first."
        ) from None


def split(file: str) -> tuple[str, str] | None:
    """`/d/000.tar/a/b.jpg` -> (`/d/000.tar`, `a/b.jpg`) when `/d/000.tar` is a file; else None."""
    parts = file.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if is_tar(parts[i - 1]):
            head = "/".join(parts[:i]) or "/"
            if os.path.isfile(head):
                return head, "/".join(parts[i:])
    return None


def read_member(file: str) -> bytes | None:
    """The bytes of the archive member that `file` names, or None if it names none.

    Raises:
        KeyError: the path goes through a tar archive that has no such member.
        InputError: the archive is not a readable uncompressed tar.
    """
    where = split(file)
    if where is None:
        return None
    tar, name = where
    m = members(tar).get(posixpath.normpath(name))
    if m is None:
        raise KeyError(f"{tar} has no member {name!r}")
    with open(tar, "rb") as fh:
        fh.seek(m.offset)
        return fh.read(m.size)


def list_archive(tar: str, image_suffixes, labels: bool) -> tuple[list[tuple[str, str | None]], dict[str, int]]:
    """The image members of an archive as (name, label) in archive order, and the other members
    counted by extension (hidden ones and the `.cls` label files not counted), as a directory walk.

    Labels (with `labels`): the text of the WebDataset `.cls` sidecar with the same key (the name
    up to the first dot of its base name), else the member's folder inside the archive, else None.
    """
    index = members(tar)
    images: list[tuple[str, str | None]] = []
    ignored: dict[str, int] = {}
    with open(tar, "rb") as fh:
        for m in index.values():
            head, base = posixpath.split(m.name)
            if base.startswith(".") or any(p.startswith(".") for p in head.split("/") if p not in ("", ".")):
                continue
            ext = posixpath.splitext(base)[1].lower()
            if ext not in image_suffixes:
                if ext != LABEL_SUFFIX:
                    ignored[ext] = ignored.get(ext, 0) + 1
                continue
            label = None
            if labels:
                sidecar = index.get(posixpath.join(head, base.split(".", 1)[0] + LABEL_SUFFIX))
                if sidecar is not None:
                    fh.seek(sidecar.offset)
                    label = fh.read(sidecar.size).decode("utf-8", errors="replace").strip() or None
                if label is None and head:
                    label = posixpath.basename(head)
            images.append((m.name, label))
    return images, ignored
