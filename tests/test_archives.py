"""Images read in place from uncompressed tar archives (WebDataset shards, class-folder tars)."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import embedx
from embedx import archives
from embedx.errors import InputError
from embedx.extractor import ExtractConfig, extract
from embedx.images import ImageDecodeError, decode_image, list_images, read_jpeg_bytes

FAST = dict(progress=False, batch_size=8)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _jpeg(seed: int, size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _pack_folder(folder: Path, tar: Path, prefix: str = "./") -> Path:
    """A tar of every file under `folder`, named as `tar` writes them with `tar -C folder -cf x.tar .`"""
    with tarfile.open(tar, "w") as tf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                _add(tf, prefix + f.relative_to(folder).as_posix(), f.read_bytes())
    return tar


def _webdataset(tar: Path, n: int, start: int = 0) -> Path:
    """WebDataset layout: key.jpg + key.cls (label) + key.json (left out), flat."""
    with tarfile.open(tar, "w") as tf:
        for i in range(start, start + n):
            _add(tf, f"{i:06d}.jpg", _jpeg(i))
            _add(tf, f"{i:06d}.cls", f"{i % 2}\n".encode())
            _add(tf, f"{i:06d}.json", b'{"caption": "x"}')
    return tar


def test_tar_of_a_folder_embeds_exactly_like_the_folder(tiny_dir, tmp_path, backbone):
    tar = _pack_folder(tiny_dir, tmp_path / "tiny.tar")
    a = extract(tiny_dir, tmp_path / "dir", ExtractConfig(num_workers=0, **FAST), backbone=backbone)
    b = extract(tar, tmp_path / "tar", ExtractConfig(num_workers=2, **FAST), backbone=backbone)  # forked decoders
    assert a.num_embedded == b.num_embedded == 24 and b.num_errors == 0
    fa, fb = embedx.read_features(tmp_path / "dir"), embedx.read_features(tmp_path / "tar")
    assert fb.paths == ["tiny.tar/" + p for p in fa.paths]
    assert fb.labels == fa.labels and set(fa.labels) == {"class_0", "class_1", "class_2"}
    assert fb.row_ids.tolist() == fa.row_ids.tolist()
    np.testing.assert_array_equal(fb.embeddings, fa.embeddings)


def test_webdataset_shards_labels_errors_and_resume(tmp_path, backbone):
    shards = tmp_path / "shards"
    shards.mkdir()
    _webdataset(shards / "000.tar", 5)
    with tarfile.open(shards / "001.tar", "w") as tf:
        _add(tf, "000005.jpg", _jpeg(5))
        _add(tf, "000005.cls", b"1")
        _add(tf, "000006.jpg", _jpeg(6)[:300])  # truncated
        _add(tf, "000007.jpg", b"")  # empty
        _add(tf, "000008.jpg", b"<html>not a jpeg</html>")
        _add(tf, "._000005.jpg", b"AppleDouble")  # hidden: not listed, not counted
    listing = list_images([shards / "000.tar", shards / "001.tar"])
    assert listing.root == str(shards.resolve())
    assert [r.path for r in listing.records][:2] == ["000.tar/000000.jpg", "000.tar/000001.jpg"]
    assert [r.label for r in listing.records] == ["0", "1", "0", "1", "0", "1", None, None, None]
    assert listing.ignored == {".json": 5}  # the .cls files were read as labels
    assert list_images([shards / "000.tar"], labels="none").records[0].label is None

    cfg = ExtractConfig(num_workers=0, shard_size=4, **FAST)
    r = extract([shards / "000.tar", shards / "001.tar"], tmp_path / "f", cfg, backbone=backbone)
    assert (r.num_embedded, r.num_errors) == (6, 3)
    errors = pq.read_table(tmp_path / "f" / "errors.parquet").to_pylist()
    kinds = {e["path"]: e["error"] for e in errors}
    assert kinds["001.tar/000007.jpg"] == "empty"
    assert kinds["001.tar/000008.jpg"] == "not_an_image"
    assert kinds["001.tar/000006.jpg"] in ("truncated", "decode_error")
    # a rerun finds everything done; the features equal a run over the members unpacked
    again = extract([shards / "000.tar", shards / "001.tar"], tmp_path / "f", cfg, backbone=backbone)
    assert again.num_skipped == 9 and again.num_done == 0
    feats = embedx.read_features(tmp_path / "f")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    for i in range(6):
        (unpacked / f"{i:06d}.jpg").write_bytes(_jpeg(i))
    extract(unpacked, tmp_path / "u", ExtractConfig(num_workers=0, **FAST), backbone=backbone)
    np.testing.assert_array_equal(feats.embeddings, embedx.read_features(tmp_path / "u").embeddings)


def test_member_paths_decode_and_read_like_files(tmp_path):
    tar = _webdataset(tmp_path / "a.tar", 2)
    member = f"{tmp_path / 'a.tar'}/000001.jpg"
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(_jpeg(1))
    np.testing.assert_array_equal(decode_image(member, as_array=True).image, decode_image(str(loose), as_array=True).image)
    assert read_jpeg_bytes(member).tobytes() == _jpeg(1)  # what --decode device sends to the GPU
    assert archives.split(member) == (str(tar), "000001.jpg")
    assert archives.split(str(loose)) is None
    with pytest.raises(ImageDecodeError) as e:
        decode_image(f"{tar}/000009.jpg")
    assert e.value.kind == "missing" and "no member '000009.jpg'" in str(e.value)
    # a member path is an input of its own (a query image for `search`, say), labelled as in the archive
    (rec,) = list_images([member]).records
    assert (rec.path, rec.file, rec.label) == (member, member, "1")
    with pytest.raises(InputError, match="has no member '000009.jpg'"):
        list_images([f"{tar}/000009.jpg"])
    (tmp_path / "list.txt").write_text(f"a.tar/000000.jpg\n{member}\nloose.jpg\n")  # a list file names members too
    assert [(r.path, r.label) for r in list_images([tmp_path / "list.txt"]).records] == [
        (f"{tar}/000000.jpg", "0"), (member, "1"), (str(loose), tmp_path.name)]
    # contact sheets (search --html, dedup --html) draw members too
    from embedx.sheet import thumbnail_data_uri

    assert thumbnail_data_uri(member).startswith("data:image/jpeg;base64,")


def test_compressed_and_broken_archives_are_refused_with_advice(tmp_path):
    src = _webdataset(tmp_path / "a.tar", 1)
    gz = tmp_path / "a.tar.gz"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(src, arcname="a.tar")
    with pytest.raises(InputError, match="compressed tar archive.*Unpack it"):
        list_images([gz])
    fake = tmp_path / "fake.tar"
    fake.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(InputError, match="not an uncompressed tar archive"):
        list_images([fake])


def test_directory_walk_says_tars_can_be_inputs(tmp_path):
    from embedx.images import describe_ignored, ignored_advice

    (tmp_path / "x.jpg").write_bytes(_jpeg(0))
    _webdataset(tmp_path / "s.tar", 1)
    listing = list_images([tmp_path])
    assert [r.path for r in listing.records] == ["x.jpg"]
    assert describe_ignored(listing.ignored) == "1 file (.tar: 1)"
    assert ignored_advice(listing.ignored) == "pass .tar archives themselves as inputs to embed the images in them"
    assert ignored_advice({".tar": 1, ".txt": 2}).endswith("; for the other files, list such files in a .txt "
                                                          "file to embed them anyway")
    assert ignored_advice({".txt": 2}) == "list such files in a .txt file to embed them anyway"


def _tarfile_members(tar):
    with tarfile.open(tar, "r:") as tf:
        return {archives._normalise(m.name): (m.offset_data, m.size) for m in tf if m.isfile()}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_reads_what_tarfile_reads(tmp_path, fmt):
    tar = tmp_path / "a.tar"
    long_dir = "d" * 90 + "/" + "e" * 60  # a ustar prefix, or a GNU/pax long name
    with tarfile.open(tar, "w", format=fmt) as tf:
        for i, name in enumerate(["a.jpg", "./b/c.png", f"{long_dir}/f.jpg", "sub/", "empty.jpg"]
                                 + ([] if fmt == tarfile.USTAR_FORMAT else ["x" * 130 + ".jpg", "ünï/cödé.jpg"])):
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            data = bytes(range(256)) * i
            info.size, info.mtime = len(data), 1_700_000_000.5  # a float mtime: pax writes a header for it
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tf.addfile(link)
    fast = archives._scan_headers(str(tar))
    assert fast is not None and {k: (m.offset, m.size) for k, m in fast.items()} == _tarfile_members(tar)
    assert f"{long_dir}/f.jpg" in fast and "b/c.png" in fast and "link.jpg" not in fast and "sub" not in fast
    for name, m in fast.items():  # the bytes at the offsets are the members' own
        with tarfile.open(tar) as tf:
            assert archives.read_member(f"{tar}/{name}") == tf.extractfile(name if name in tf.getnames()
                                                                            else "./" + name).read()


def test_unusual_archives_are_left_to_tarfile_and_replaced_ones_reread(tmp_path):
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a.jpg")
        info.pax_headers = {"hdrcharset": "BINARY"}  # a pax key the scan does not know: tarfile reads it
        data = _jpeg(0)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(archives._Unusual):
        archives._scan_headers(str(tar))
    assert {k: (m.offset, m.size) for k, m in archives.members(tar).items()} == _tarfile_members(tar)
    assert archives.read_member(f"{tar}/a.jpg") == _jpeg(0)
    # the same path, rewritten with other members: the index and the open descriptor follow
    import os
    import time

    time.sleep(0.01)
    _webdataset(tar, 2, start=5)
    os.utime(tar, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert archives.read_member(f"{tar}/000006.jpg") == _jpeg(6)
    with pytest.raises(KeyError):
        archives.read_member(f"{tar}/a.jpg")


def test_listing_counts_what_it_finds_on_a_bar(tmp_path, monkeypatch, capsys):
    """Listing a million files takes a minute: with progress on, a bar (shown after a second)
    counts the images found in folders and archives."""
    import embedx._progress as progress

    made = []
    real = progress.progress_bar

    def eager(*a, **k):  # no delay, so that the bar shows at once
        made.append(real(*a, **{**k, "delay": 0.0}))
        return made[-1]

    monkeypatch.setattr(progress, "progress_bar", eager)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "d" / "sub" / f"{i}.jpg").write_bytes(_jpeg(i))
    _webdataset(tmp_path / "s.tar", 4)
    listing = list_images([tmp_path / "d", tmp_path / "s.tar"], progress=True)
    assert len(listing.records) == 7 and made[0].n == 7 and made[0].desc == "listing"
    assert "listing" in capsys.readouterr().err
    list_images([tmp_path / "d"])  # progress off by default: library calls stay quiet
    assert made[-1].disable
