"""Decoding in a process of its own (`embedx._isolated.DecodeProcess`, what `embedx serve` decodes
query images with): the same items as decoding here, and an image that kills the decoding library
costs an error item and a new process, not the caller."""

import shutil

import numpy as np

from embedx._isolated import DecodeProcess
from embedx._loader import ImageDataset
from embedx.images import ImageRecord

from .conftest import crash_on_content


def _dataset(files, backbone):
    records = [ImageRecord(i, str(f), str(f), None) for i, f in enumerate(files)]
    return ImageDataset(records, backbone.decode_spec(True))


def _same_items(got, want):
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[2:] == w[2:], (g[2:], w[2:])  # size, error
        if w[1] is None:
            assert g[1] is None
        else:
            np.testing.assert_array_equal(g[1], w[1])


def test_items_equal_decoding_here(photo_dir, tmp_path, backbone):
    files = sorted(photo_dir.rglob("*.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    files.insert(1, bad)
    dataset = _dataset(files, backbone)
    decoder = DecodeProcess(threads=2)  # (a batch's images on two threads there)
    try:
        got = decoder.decode(dataset, 0, len(files))
        _same_items(got, [dataset[i] for i in range(len(files))])
        assert got[1][1] is None and got[1][4][0] == "not_an_image"
        _same_items(decoder.decode(dataset, 2, 4), [dataset[2], dataset[3]])  # the same process again
        assert decoder.starts == 1
        proc = decoder._proc
    finally:
        decoder.close()
    assert proc.poll() == 0  # asked to stop, not killed


def test_a_crashing_image_is_an_error_item_and_the_rest_are_decoded(photo_dir, tmp_path, backbone, monkeypatch):
    files = sorted(photo_dir.rglob("*.jpg"))[:3]
    crash = tmp_path / "crash.jpg"
    shutil.copy(files[0], crash)
    with open(crash, "ab") as f:
        f.write(b"crafted")  # other bytes than files[0], the same picture
    for name, value in crash_on_content(tmp_path, crash.read_bytes()).items():
        monkeypatch.setenv(name, value)  # for the decoder processes (this one is not patched)
    files.insert(1, crash)
    dataset = _dataset(files, backbone)
    decoder = DecodeProcess(threads=2)  # (a batch's images on two threads there)
    try:
        got = decoder.decode(dataset, 0, len(files))
        assert got[1][1] is None and got[1][4][0] == "decoder_crashed" and "SIGSEGV" in got[1][4][1], got[1][4]
        _same_items([got[0], *got[2:]], [dataset[i] for i in (0, 2, 3)])
        # the batch, then its images one at a time: the first alone in a fresh process, which the
        # crashing one killed, the rest in a third
        assert decoder.starts == 3
        _same_items(decoder.decode(dataset, 2, 4), [dataset[2], dataset[3]])
        assert decoder.starts == 3
        alone = decoder.decode(dataset, 1, 2)  # a batch of the crashing image alone: it kills the third
        assert alone[0][4][0] == "decoder_crashed" and decoder.starts == 3
        _same_items(decoder.decode(dataset, 0, 1), [dataset[0]])  # in a fourth
        assert decoder.starts == 4
    finally:
        decoder.close()


def test_closed_decoder_still_answers_then_ends_its_process(photo_dir, backbone):
    """A server swapping backbones closes the old encoder while requests may still be queued for
    it: those are still decoded, and no process is left behind."""
    files = sorted(photo_dir.rglob("*.jpg"))[:2]
    dataset = _dataset(files, backbone)
    decoder = DecodeProcess()
    decoder.close()
    _same_items(decoder.decode(dataset, 0, 2), [dataset[0], dataset[1]])
    assert decoder._proc is None and decoder.starts == 1


def test_a_hanging_decode_is_ended_and_reported(photo_dir, tmp_path, backbone, monkeypatch):
    files = sorted(photo_dir.rglob("*.jpg"))[:2]
    hang = tmp_path / "hang.jpg"
    hang.write_bytes(files[0].read_bytes() + b"hangs")
    for name, value in crash_on_content(tmp_path, hang.read_bytes(), hang=True).items():
        monkeypatch.setenv(name, value)
    files.insert(1, hang)
    dataset = _dataset(files, backbone)
    decoder = DecodeProcess(timeout=3)  # (a process's start-up does not count)
    try:
        got = decoder.decode(dataset, 0, 3)
        assert got[1][1] is None and got[1][4] == (
            "decoder_crashed", "decoding it did not end in 3 s (the decoder process was ended)"), got[1][4]
        _same_items([got[0], got[2]], [dataset[0], dataset[2]])
    finally:
        decoder.close()


def test_works_from_a_script_without_a_main_guard(photo_dir, tmp_path):
    """The decoder process is a fresh interpreter running embedx, not multiprocessing's spawn,
    which would run the calling script again in it (and fail without `if __name__ == ...`)."""
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(f"""
from pathlib import Path
from embedx._isolated import DecodeProcess
from embedx._loader import ImageDataset
from embedx.backbone import load_backbone
from embedx.images import ImageRecord
files = sorted(Path({str(photo_dir)!r}).rglob("*.jpg"))
dataset = ImageDataset([ImageRecord(i, str(f), str(f), None) for i, f in enumerate(files)],
                       load_backbone("test_efficientnet", weights="random").decode_spec(True))
decoder = DecodeProcess()
items = decoder.decode(dataset, 0, len(files))
decoder.close()
print("decoded", sum(item[1] is not None for item in items), "of", len(files))
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    n = len(list(photo_dir.rglob("*.jpg")))
    assert r.returncode == 0 and f"decoded {n} of {n}" in r.stdout, r.stdout + r.stderr[-2000:]


def test_cli_predict_isolated_skips_an_image_that_crashes_the_decoder(tiny_dir, tmp_path, backbone):
    """`embedx predict --isolate-decode` where decoding one image segfaults (in every process): that
    image is skipped as decoder_crashed, the others are predicted, the run ends well."""
    import os
    import subprocess
    import sys

    from embedx.extractor import ExtractConfig, extract
    from embedx.train import HeadConfig, train_head

    extract(tiny_dir, tmp_path / "f", ExtractConfig(progress=False, num_workers=0), backbone=backbone)
    train_head(tmp_path / "f", tmp_path / "h", HeadConfig(l2s=(1e-3,)))
    photos = tmp_path / "new"
    shutil.copytree(tiny_dir / sorted(p.name for p in tiny_dir.iterdir() if p.is_dir())[0], photos)
    good = sorted(photos.iterdir())
    crash = photos / "crash.jpg"
    crash.write_bytes(good[0].read_bytes() + b"crafted")
    env = dict(os.environ, HF_HUB_OFFLINE="1", **crash_on_content(tmp_path, crash.read_bytes()))
    r = subprocess.run([sys.executable, "-m", "embedx", "predict", str(tmp_path / "h"), str(photos), "--isolate-decode",
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipped {crash}: decoder_crashed" in r.stderr and "SIGSEGV" in r.stderr, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("path\tpredicted") and sorted(line.split("\t")[0] for line in lines[1:]) == \
        sorted(str(p) for p in good)


def test_a_process_that_cannot_start_is_an_error_not_a_crashing_image(photo_dir, tmp_path, backbone, monkeypatch):
    """A decoder process that dies before it is ready (a broken install) fails the call at once,
    instead of blaming each image in turn."""
    import pytest

    site = tmp_path / "broken-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos._exit(3)  # as an interpreter that cannot start\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    files = sorted(photo_dir.rglob("*.jpg"))[:2]
    decoder = DecodeProcess()
    try:
        with pytest.raises(RuntimeError, match=r"ended while starting \(it exited with code 3\)"):
            decoder.decode(_dataset(files, backbone), 0, 2)
        assert decoder.starts == 1
    finally:
        decoder.close()


def test_only_the_batch_records_travel(backbone):
    """What is sent for a batch is its own records (a dataset of them), not the whole folder's."""
    import pickle

    from embedx._isolated import _part

    files = [f"/photos/{i:06d}.jpg" for i in range(5000)]
    dataset = ImageDataset([ImageRecord(i, f, f, None) for i, f in enumerate(files)], backbone.decode_spec(True),
                           crashed={7: "killed", 4000: "killed"})
    part = _part(dataset, [4000, 4001])
    assert [r.file for r in part.records] == files[4000:4002] and part.crashed == {4000: "killed"}
    assert part[0][4] == ("decoder_crashed", "killed")  # (crashed images are known by row id)
    assert len(pickle.dumps(part)) * 50 < len(pickle.dumps(dataset))
