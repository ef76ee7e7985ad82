"""Decode threads (`--decode-threads`): each batch decoded by several threads in this process
gives exactly the serial loader's batches, and the short OpenMP spin wait that lets them run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, photo_dir, tiny_dir):
    """Real photos, small JPEGs and PNGs, and two files that fail to decode."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(photo_dir, root / "photos")
    shutil.copytree(tiny_dir, root / "tiny")
    (root / "tiny" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "photos" / "chelsea" / "empty.png").write_bytes(b"")
    return root


def _dataset(directory, backbone):
    from embedx._loader import ImageDataset
    from embedx.images import list_images

    return ImageDataset(list_images([directory]).records, backbone.decode_spec(True))


@pytest.mark.parametrize("batch_size,threads", [(4, 2), (7, 3), (3, 4), (64, 2)])
def test_threaded_batches_equal_the_serial_loaders(mixed_dir, backbone, batch_size, threads):
    import torch

    from embedx._loader import ThreadedBatches, make_loader

    dataset = _dataset(mixed_dir, backbone)
    serial = list(make_loader(dataset, batch_size, num_workers=0, pin_memory=False))
    threaded_loader = make_loader(dataset, batch_size, num_workers=0, pin_memory=False, decode_threads=threads)
    assert isinstance(threaded_loader, ThreadedBatches)
    threaded = list(threaded_loader)
    assert len(threaded) == len(serial) == len(threaded_loader)
    for a, b in zip(serial, threaded):
        assert a.positions == b.positions
        assert a.ok == b.ok and a.errors == b.errors
        assert a.widths == b.widths and a.heights == b.heights
        assert torch.equal(a.pixels, b.pixels)
    assert sum(not ok for b in threaded for ok in b.ok) == 2  # the two broken files, recorded


def test_threads_decode_each_batch_together_and_share_it_by_image(mixed_dir, backbone):
    """Both threads hold an image at once (a barrier each first image waits on), and a slow image
    holds up one thread only: while it waits until the other 7 images of its batch of 8 are
    decoded, the other thread decodes them all (fixed halves would leave it 3 and time out)."""
    from embedx._loader import ThreadedBatches

    dataset = _dataset(mixed_dir, backbone)
    seen: dict[int, str] = {}
    lock, all_but_first = threading.Lock(), threading.Event()
    together = threading.Barrier(2, timeout=20)
    getitem = dataset.__getitem__

    class Spy:
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            name = threading.current_thread().name
            first = name not in seen.values()
            with lock:
                seen[i] = name
            if first:
                together.wait()  # each thread's first image: both threads are decoding
            if i == 8:  # the second batch's first image: slow until the rest of its batch is done
                assert all_but_first.wait(20), "the other thread left part of the batch undecoded"
            item = getitem(i)
            with lock:
                if sum(1 for j in range(9, 16) if j in seen) == 7:
                    all_but_first.set()
            return item

    batches = list(ThreadedBatches(Spy(), 8, 2))
    assert [p for b in batches for p in b.positions] == list(range(len(dataset)))
    assert len(dataset) >= 16 and len(set(seen.values())) == 2
    assert len({seen[j] for j in range(9, 16)}) == 1 and seen[9] != seen[8]


def test_one_thread_is_refused_by_threaded_batches_and_means_the_serial_loader(mixed_dir, backbone):
    from embedx._loader import ThreadedBatches, make_loader

    dataset = _dataset(mixed_dir, backbone)
    with pytest.raises(ValueError, match="2 threads"):
        ThreadedBatches(dataset, 4, 1)
    assert not isinstance(make_loader(dataset, 4, 0, False, decode_threads=1), ThreadedBatches)
    # decoder processes decode; threads in this process do not apply
    assert not isinstance(make_loader(dataset, 4, 1, False, decode_threads=4), ThreadedBatches)


def test_extract_with_decode_threads_writes_what_one_thread_writes(mixed_dir, backbone, tmp_path):
    from embedx import read_features
    from embedx.extractor import ExtractConfig, extract

    runs = {}
    for threads in (1, 3):
        cfg = ExtractConfig(batch_size=4, num_workers=0, decode_threads=threads, progress=False, compile="no")
        r = extract(mixed_dir, tmp_path / f"t{threads}", cfg, backbone=backbone)
        assert (r.num_embedded, r.num_errors) == (30, 2)
        runs[threads] = read_features(tmp_path / f"t{threads}")
    a, b = runs[1], runs[3]
    assert list(a.paths) == list(b.paths)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)


def test_decode_threads_below_one_are_refused(tmp_path, tiny_dir):
    from embedx.errors import InputError
    from embedx.extractor import ExtractConfig, extract

    with pytest.raises(InputError, match="--decode-threads must be 1"):
        extract(tiny_dir, tmp_path / "f", ExtractConfig(decode_threads=0, progress=False))


@pytest.mark.parametrize("environ,short", [
    ({}, False),  # libgomp's default: 300,000 spins
    ({"GOMP_SPINCOUNT": "30000"}, True),
    ({"GOMP_SPINCOUNT": "100000"}, True),
    ({"GOMP_SPINCOUNT": "300000"}, False),
    ({"GOMP_SPINCOUNT": "infinite"}, False),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, True),
    ({"OMP_WAIT_POLICY": "active"}, False),
])
def test_spin_wait_is_short(environ, short):
    from embedx._openmp import spin_wait_is_short

    assert spin_wait_is_short(environ) is short


def test_an_intel_or_llvm_runtime_is_not_short_whatever_gomp_spincount_says():
    from embedx._openmp import spin_wait_is_short

    assert not spin_wait_is_short({"GOMP_SPINCOUNT": "30000"}, openmp="intel")
    assert not spin_wait_is_short({"GOMP_SPINCOUNT": "30000"}, openmp=None)
    assert spin_wait_is_short({"OMP_WAIT_POLICY": "passive"}, openmp="llvm")


@pytest.mark.parametrize("libs,want", [
    (["/x/torch/lib/libgomp.so.1", "/usr/lib/libc.so.6"], "gnu"),
    (["/opt/conda/lib/libiomp5.so"], "intel"),
    (["/usr/lib/libomp.so.5"], "llvm"),
    (["/usr/lib/libc.so.6"], None),
])
def test_the_openmp_runtime_is_told_from_the_loaded_libraries(tmp_path, libs, want):
    from embedx._openmp import runtime

    maps = tmp_path / "maps"
    maps.write_text("".join(f"7f00-7f01 r-xp 00000000 08:01 1 {lib}\n" for lib in libs))
    assert runtime(str(maps)) == want
    assert runtime(str(tmp_path / "missing")) is None


def test_this_process_runs_torch_with_libgomp():
    """The rule above is measured for libgomp: torch's Linux wheels load it (else the default
    decode-thread rule falls back to one thread, and this says the environment changed)."""
    import sys

    import torch

    from embedx._openmp import runtime

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/maps is Linux's")
    assert runtime() == "gnu", f"torch {torch.__version__} loads another OpenMP runtime"


def test_default_decode_threads_follow_the_spin_wait_and_the_decoder_processes(monkeypatch):
    from embedx import _openmp, extractor

    monkeypatch.setattr(_openmp, "runtime", lambda: "gnu")
    monkeypatch.setattr(extractor, "_model_threads", lambda: 2)
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    assert extractor.default_decode_threads(0) == 2
    assert extractor.default_decode_threads(3) == 1  # decoder processes do the decoding
    monkeypatch.setattr(extractor, "_model_threads", lambda: 64)
    assert extractor.default_decode_threads(0) == 8
    monkeypatch.setattr(extractor, "_model_threads", lambda: 1)  # e.g. --devices cpu,cpu on 2 cores
    assert extractor.default_decode_threads(0) == 1
    monkeypatch.setattr(extractor, "_model_threads", lambda: 2)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert extractor.default_decode_threads(0) == 1  # workers that spin would take the threads' cores
    monkeypatch.setenv("GOMP_SPINCOUNT", "30000")
    monkeypatch.setattr(_openmp, "runtime", lambda: "intel")
    assert extractor.default_decode_threads(0) == 1  # KMP_BLOCKTIME's runtime: not measured, not assumed


def _spin_count_seen_by_the_cli(env: dict) -> str:
    code = "import os, sys, embedx.cli; import torch; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def test_the_cli_shortens_the_spin_wait_before_torch_loads_unless_the_user_set_it():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert _spin_count_seen_by_the_cli(env) == "30000"
    assert _spin_count_seen_by_the_cli({**env, "GOMP_SPINCOUNT": "5000"}) == "5000"


def test_the_spin_wait_is_left_alone_once_torch_is_loaded():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    code = ("import os, torch; from embedx._openmp import shorten_spin_wait; "
            "shorten_spin_wait(); print(os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None"]
