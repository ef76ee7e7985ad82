"""Images inside tar archives (WebDataset shards, ImageNet-style class tars), read in place.

A member is named by a path that goes *through* its archive: `/data/shards/000.tar/img/1.jpg`
is the member `img/1.jpg` of `/data/shards/000.tar`. Such paths travel through embedx like
any other file path (records, shards, search results, contact sheets); `read_member` reads
the bytes with one pread, from an index of the archive's members built once per process.
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
    return _members(*_version(tar))


def _version(tar: str | os.PathLike) -> tuple[str, int, int]:
    """(absolute path, size, mtime): what the member index and the open descriptors are keyed by."""
    st = os.stat(tar)
    return os.path.abspath(tar), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _members(tar: str, _size: int, _mtime_ns: int) -> dict[str, Member]:
    try:
        found = _scan_headers(tar)
    except _Unusual:  # GNU sparse files, base-256 sizes, odd pax records, …: tarfile knows them all
        found = None
    except OSError as e:
        raise InputError(f"Cannot read the archive {tar}: {e}") from None
    if found is not None:
        return found
    try:
        with tarfile.open(tar, mode="r:") as tf:
            found = {}
            for m in tf:  # headers only: tarfile seeks over the data
                if m.isfile():
                    name = _normalise(m.name)
                    found[name] = Member(name, m.offset_data, m.size)
            return found
    except OSError as e:
        raise InputError(f"Cannot read the archive {tar}: {e}") from None
    except tarfile.TarError as e:
        raise InputError(
            f"{tar} is not an uncompressed tar archive ({e}). A compressed archive has to be "
            "unpacked to a .tar (e.g. `gunzip shard.tar.gz`) or a folder first."
        ) from None


def _normalise(name: str) -> str:
    return posixpath.normpath(name.lstrip("/"))


class _Unusual(Exception):
    """A header `_scan_headers` leaves to tarfile."""


_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous: tarfile's isfile()
_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no images


def _scan_headers(tar: str) -> dict[str, Member] | None:
    """The regular files of a ustar / GNU / pax archive, from its headers alone, with one read
    per header: 3-4x faster than tarfile's member objects (benchmarks/README), which matters at
    millions of images. Returns None where the file does not start like
    a tar archive (tarfile then says what it is); raises _Unusual for anything beyond the common
    subset (tarfile then reads the archive). Names decode as tarfile's (UTF-8, surrogateescape)."""
    found: dict[str, Member] = {}
    fd = os.open(tar, os.O_RDONLY)
    try:
        pos, next_name, next_size = 0, None, None
        while True:
            hdr = os.pread(fd, _BLOCK, pos)
            if len(hdr) < _BLOCK or hdr.count(0) == _BLOCK:  # end of archive (or a truncated one)
                if pos == 0:
                    return None
                return found
            if hdr[124] & 0x80:
                raise _Unusual("base-256 number")
            try:
                checksum = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
                size = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                if pos == 0:
                    return None
                raise _Unusual("invalid number field") from None
            if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as spaces
                if pos == 0:
                    return None
                raise _Unusual("bad checksum")
            kind = hdr[156:157]
            data = pos + _BLOCK
            if kind == b"x":  # pax extended header of the next member
                next_name, size_override = _pax(os.pread(fd, size, data))
                next_size = size_override if size_override is not None else next_size
            elif kind == b"L":  # GNU long name of the next member
                next_name = os.pread(fd, size, data).split(b"\0", 1)[0]
            elif kind == b"g":  # pax global header: only harmless keys are allowed through
                name, size_override = _pax(os.pread(fd, size, data))
                if name is not None or size_override is not None:
                    raise _Unusual("global path or size")
            elif kind in _FILE_TYPES or kind in _OTHER_TYPES:
                if next_name is not None:
                    raw = next_name
                else:
                    raw = hdr[:100].split(b"\0", 1)[0]
                    prefix = hdr[345:500].split(b"\0", 1)[0]  # ustar's name prefix, read as tarfile does
                    if prefix:
                        raw = prefix + b"/" + raw
                if next_size is not None:
                    size = next_size
                if kind in _FILE_TYPES and not raw.endswith(b"/"):
                    name = _normalise(raw.decode("utf-8", "surrogateescape"))
                    found[name] = Member(name, data, size)
                next_name, next_size = None, None
                if kind in _OTHER_TYPES:
                    size = 0  # links, directories, devices: no data blocks follow (as tarfile reads them)
            else:
                raise _Unusual(f"member type {kind!r}")
            pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    finally:
        os.close(fd)


_PAX_IGNORED = frozenset({b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname", b"linkpath", b"comment",
                          b"charset"})


def _pax(records: bytes) -> tuple[bytes | None, int | None]:
    """(path, size) from pax extended-header records ("LEN key=value\n"), either None if absent."""
    path = size = None
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            raise _Unusual("pax record length") from None
        if length <= 0:
            break
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        pos += length
        if key == b"path":
            path = value
        elif key == b"size":
            try:
                size = int(value)
            except ValueError:
                raise _Unusual("pax size") from None
        elif key not in _PAX_IGNORED and not key.startswith((b"SCHILY.", b"LIBARCHIVE.")):
            raise _Unusual(f"pax key {key!r}")
    return path, size


def split(file: str) -> tuple[str, str] | None:
    """`/d/000.tar/a/b.jpg` -> (`/d/000.tar`, `a/b.jpg`) when `/d/000.tar` is a file; else None."""
    parts = file.replace(os.sep, "/").split("/")
    for i in range(len(parts) - 1, 0, -1):
        if is_tar(parts[i - 1]):
            head = "/".join(parts[:i]) or "/"
            if os.path.isfile(head):
                return head, "/".join(parts[i:])
    return None


def has_member(tar: str, name: str) -> bool:
    return _normalise(name) in members(tar)


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
    version = _version(tar)
    m = _members(*version).get(_normalise(name))
    if m is None:
        raise KeyError(f"{tar} has no member {name!r}")
    return _OPEN.read(version, m.offset, m.size)


class _OpenArchives:
    """Archives kept open for reading members, the least recently used closed beyond `limit`:
    one pread per image instead of open + seek + read + close. Keyed by (path, size, mtime), so
    an archive replaced on disk is opened afresh. Reads hold the lock (a decoding process reads
    from one thread at a time anyway), so no descriptor is closed under a read; forked children
    start with an empty table of their own (a lock held at the fork would never be released)."""

    def __init__(self, limit: int = 32):
        self.limit = limit
        self._reset()

    def _reset(self) -> None:
        import collections
        import threading

        self.fds: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def read(self, version: tuple, offset: int, size: int) -> bytes:
        with self.lock:
            fd = self.fds.get(version)
            if fd is None:
                fd = os.open(version[0], os.O_RDONLY)
                self.fds[version] = fd
                while len(self.fds) > self.limit:
                    os.close(self.fds.popitem(last=False)[1])
            else:
                self.fds.move_to_end(version)
            data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{version[0]}: member at byte {offset} is cut short ({len(data)} of {size} bytes)")
        return data

    def after_fork(self) -> None:
        for fd in self.fds.values():  # the child's copies; the parent's stay open
            os.close(fd)
        self._reset()


_OPEN = _OpenArchives()
os.register_at_fork(after_in_child=_OPEN.after_fork)


def list_archive(tar: str, image_suffixes, labels: bool) -> tuple[list[tuple[str, str | None]], dict[str, int]]:
    """The image members of an archive as (name, label) in archive order, and the other members
    counted by extension (hidden ones and the `.cls` label files not counted), as a directory walk.

    Labels (with `labels`): the text of the WebDataset `.cls` sidecar with the same key (the name
    up to the first dot of its base name), else the member's folder inside the archive, else None.
    """
    version = _version(tar)
    index = _members(*version)
    images: list[tuple[str, str | None]] = []
    ignored: dict[str, int] = {}
    for m in index.values():
        head, base = posixpath.split(m.name)
        if base.startswith(".") or any(p.startswith(".") for p in head.split("/") if p not in ("", ".")):
            continue
        ext = posixpath.splitext(base)[1].lower()
        if ext not in image_suffixes:
            if ext != LABEL_SUFFIX:
                ignored[ext] = ignored.get(ext, 0) + 1
            continue
        images.append((m.name, _label(version, index, m.name) if labels else None))
    return images, ignored


def member_label(tar: str, name: str) -> str | None:
    """The label `list_archive` gives the member `name` (which must exist: see `members`)."""
    version = _version(tar)
    return _label(version, _members(*version), _normalise(name))


def _label(version: tuple, index: dict[str, Member], name: str) -> str | None:
    """WebDataset's `.cls` sidecar of the same key (the name up to the first dot of its base
    name), else the member's folder inside the archive, else None."""
    head, base = posixpath.split(name)
    sidecar = index.get(posixpath.join(head, base.split(".", 1)[0] + LABEL_SUFFIX))
    if sidecar is not None:
        label = _OPEN.read(version, sidecar.offset, sidecar.size).decode("utf-8", errors="replace").strip()
        if label:
            return label
    return posixpath.basename(head) or None
