import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedx
from embedx import shards
from embedx.errors import LockedError, OutputExistsError
from embedx.extractor import ExtractConfig, extract

from .conftest import segfault_on

FAST = dict(progress=False, num_workers=0, batch_size=8)


def _cfg(**kw):
    return ExtractConfig(**{**FAST, **kw})


def test_shard_contract(tiny_dir, tmp_path, backbone):
    out = tmp_path / "f"
    r = extract(tiny_dir, out, _cfg(shard_size=10), backbone=backbone)
    assert (r.num_images, r.num_embedded, r.num_errors) == (24, 24, 0)
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    t = pq.read_table(files[0])
    assert t.schema.field("row_id").type == pa.int64()
    assert t.schema.field("path").type == pa.string()
    assert t.schema.field("label").type == pa.string()
    emb_type = t.schema.field("embedding").type
    assert isinstance(emb_type, pa.FixedSizeListType) and emb_type.list_size == 1280
    assert emb_type.value_type == pa.float32()
    assert t.schema.field("width").type == pa.int32() and t.schema.field("height").type == pa.int32()
    meta = json.loads(t.schema.metadata[b"embedx"])
    for key in ("model", "weights_source", "weights_sha256", "data_config", "pooling", "normalized", "dim",
                "dtype", "embedx_version"):
        assert key in meta, key
    assert meta["model"] == "tf_efficientnet_lite0" and meta["dim"] == 1280
    assert meta["weights_source"].startswith("bundled:") and len(meta["weights_sha256"]) == 64
    for key in ("input_size", "crop_pct", "mean", "std", "interpolation"):
        assert key in meta["data_config"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 4] and manifest["complete"]
    assert manifest["config"]["model"] == "tf_efficientnet_lite0"
    assert pq.read_table(out / "errors.parquet").num_rows == 0
    # zstd everywhere; the float embedding values are not dictionary-encoded (slower, larger)
    chunks = {c.path_in_schema: c for c in (pq.ParquetFile(files[0]).metadata.row_group(0).column(i)
                                            for i in range(6))}
    assert {c.compression for c in chunks.values()} == {"ZSTD"}
    assert not any("DICTIONARY" in e for e in chunks["embedding.list.element"].encodings)
    assert any("DICTIONARY" in e for e in chunks["label"].encodings)
    # original sizes recorded
    from PIL import Image

    first = pq.read_table(files[0]).to_pylist()[0]
    with Image.open(tiny_dir / first["path"]) as im:
        assert (first["width"], first["height"]) == im.size


def test_read_features_contiguous_and_complete(tiny_dir, tmp_path, backbone):
    out = tmp_path / "f"
    extract(tiny_dir, out, _cfg(shard_size=7), backbone=backbone)
    f = embedx.read_features(out)
    assert f.embeddings.shape == (24, 1280) and f.embeddings.flags["C_CONTIGUOUS"]
    assert f.row_ids.tolist() == list(range(24))
    assert f.paths == sorted(f.paths) and f.labels[0] == "class_0"
    assert np.isfinite(f.embeddings).all() and f.embeddings.std() > 0
    assert f.metadata["model"] == "tf_efficientnet_lite0" and f.root == str(tiny_dir.resolve())


def test_other_readers_read_shards_unchanged(tiny_dir, tmp_path, backbone):
    import duckdb
    import pandas as pd
    import polars as pl

    out = tmp_path / "f"
    extract(tiny_dir, out, _cfg(shard_size=10), backbone=backbone)
    ref = embedx.read_features(out)
    df = pd.read_parquet(out / "part-00000.parquet")
    np.testing.assert_array_equal(np.stack(df["embedding"].to_numpy()), ref.embeddings[:10])
    pdf = pl.read_parquet(str(out / "part-*.parquet"))
    assert pdf.height == 24 and pdf["path"].to_list() == ref.paths
    con = duckdb.connect()
    n, labels = con.execute(
        f"select count(*), count(distinct label) from read_parquet('{out}/part-*.parquet')"
    ).fetchone()
    assert (n, labels) == (24, 3)


def test_torture_folder_records_errors_and_goes_on(tmp_path, backbone):
    from PIL import Image

    d = tmp_path / "torture"
    d.mkdir()
    rng = np.random.default_rng(3)
    good = Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    good.save(d / "good.jpg")
    good.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(d / "sixteen.png")
    good.convert("P").save(d / "palette.png", transparency=0)
    good.save(d / "anim.gif", save_all=True, append_images=[good.rotate(90)])
    exif = Image.Exif()
    exif[0x0112] = 6
    good.save(d / "rotated.jpg", exif=exif)
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_bytes(b"hello world, not a png")
    raw = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    Image.new("RGB", (1200, 1000)).save(d / "huge.png")
    os.symlink(d / "does-not-exist.jpg", d / "dangling.jpg")
    os.symlink(d, d / "loop")  # a folder linked to itself: skipped, and the result says so
    r = extract(d, tmp_path / "f", _cfg(max_pixels=1_000_000, shard_size=4), backbone=backbone)
    assert list(r.skipped_dirs) == [str(d / "loop")] and r.skipped_dirs[str(d / "loop")].startswith("symlink loop")
    errors = pq.read_table(tmp_path / "f" / "errors.parquet").to_pylist()
    kinds = {e["path"]: e["error"] for e in errors}
    assert kinds == {
        "zero.jpg": "empty", "text.png": "not_an_image", "truncated.jpg": kinds.get("truncated.jpg"),
        "huge.png": "too_large", "dangling.jpg": "missing",
    }
    assert kinds["truncated.jpg"] in ("truncated", "decode_error")
    assert r.num_embedded == 6 and r.num_errors == 5
    f = embedx.read_features(tmp_path / "f")
    assert sorted(f.paths) == sorted(["good.jpg", "cmyk.jpg", "sixteen.png", "palette.png", "anim.gif", "rotated.jpg"])
    rows = {r["path"]: r for t in shards.iter_shards(tmp_path / "f") for r in t.to_pylist()}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (50, 60)  # upright size


def test_deterministic_across_worker_counts_and_prefetch(tiny_dir, tmp_path, backbone):
    a = extract(tiny_dir, tmp_path / "a", _cfg(num_workers=0), backbone=backbone)
    b = extract(tiny_dir, tmp_path / "b", _cfg(num_workers=2), backbone=backbone)
    c = extract(tiny_dir, tmp_path / "c", _cfg(num_workers=2, prefetch=0), backbone=backbone)  # no prefetch thread
    d = extract(tiny_dir, tmp_path / "d", _cfg(num_workers=0, prefetch=2), backbone=backbone)  # decoding on the thread
    assert a.num_embedded == b.num_embedded == c.num_embedded == d.num_embedded == 24
    fa, fb, fc, fd = (embedx.read_features(tmp_path / x) for x in "abcd")
    assert fa.paths == fb.paths == fc.paths == fd.paths
    assert fa.row_ids.tolist() == fb.row_ids.tolist() == fc.row_ids.tolist() == fd.row_ids.tolist()
    for f in (fb, fc, fd):
        np.testing.assert_array_equal(fa.embeddings, f.embeddings)
    assert {"plan", "startup", "input_wait", "loader_wait", "prepare", "model", "write"} <= set(b.stage_seconds)
    assert 0 < b.setup_seconds < b.seconds
    assert b.num_done == 24 and b.engine_images_per_second > b.images_per_second > 0


def test_an_image_that_kills_its_decoder_is_recorded_and_the_run_goes_on(tiny_dir, tmp_path, backbone,
                                                                           monkeypatch, caplog):
    """A decoding library that crashes (SIGSEGV) on two images, or an out-of-memory kill: the
    decoder process dies. The run finds the images, records them as `decoder_crashed` errors and
    embeds every other row exactly as a clean run does, instead of ending (at every resume)."""
    import signal

    from embedx import _loader

    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))
    killers = {files[5], files[17]}  # in the first and in the last shard
    real = _loader.decode_image

    def decode(file, *args, **kwargs):
        if file in killers:
            os.kill(os.getpid(), signal.SIGSEGV)  # in the decoder process (forked: it has this patch)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(_loader, "decode_image", decode)
    cfg = _cfg(num_workers=2, batch_size=4, shard_size=8)
    with caplog.at_level("WARNING", logger="embedx.extractor"):
        r = extract(tiny_dir, tmp_path / "crash", cfg, backbone=backbone)
    assert r.num_embedded == 22 and r.num_errors == 2
    assert r.time_shares()["finding a crashing image"] > 0  # said where the time went
    errors = {e["path"]: e for e in shards.read_errors(tmp_path / "crash").to_pylist()}
    root = str(tiny_dir.resolve())
    assert set(errors) == {os.path.relpath(k, root) for k in killers}
    assert all(e["error"] == "decoder_crashed" and "SIGSEGV" in e["message"] for e in errors.values()), errors
    assert "decoding it killed the decoder process" in caplog.text
    monkeypatch.setattr(_loader, "decode_image", real)
    extract(tiny_dir, tmp_path / "clean", _cfg(num_workers=0, batch_size=4, shard_size=8), backbone=backbone)
    crash, clean = embedx.read_features(tmp_path / "crash"), embedx.read_features(tmp_path / "clean")
    keep = [i for i, p in enumerate(clean.paths) if p not in errors]
    assert crash.paths == [clean.paths[i] for i in keep]
    np.testing.assert_array_equal(crash.embeddings, clean.embeddings[keep])
    assert extract(tiny_dir, tmp_path / "crash", cfg, backbone=backbone).num_skipped == 24  # done

    # a death that does not come again when the images are decoded one by one (memory pressure):
    # said, with what to try; shards completed before it (if any) are kept, and the rerun resumes
    marker = tmp_path / "died-once"

    def decode_once(file, *args, **kwargs):
        if file == files[13] and not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(_loader, "decode_image", decode_once)
    with pytest.raises(embedx.EmbedxError, match="out of memory\\? Rerun with fewer --num-workers"):
        extract(tiny_dir, tmp_path / "oom", cfg, backbone=backbone)
    assert len(shards.read_manifest(tmp_path / "oom")["shards"]) < 3
    done = extract(tiny_dir, tmp_path / "oom", cfg, backbone=backbone)  # the rerun resumes
    assert done.num_embedded == 24 and done.num_errors == 0


@pytest.mark.parametrize("cpus, device, workers, prefetch", [
    (2, "cpu", 0, 0),  # the model's threads take both cores: decode between batches, inline
    (1, "cpu", 0, 0),
    (8, "cpu", 2, 2),  # decoder processes, and the thread hands their batches over
    (2, "cuda", 1, 2),  # on a GPU the CPU decoders are the bottleneck
    (16, "cuda", 15, 2),
])
def test_default_decoders_and_prefetch_follow_the_hardware(monkeypatch, cpus, device, workers, prefetch):
    from embedx.extractor import default_num_workers, default_prefetch

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert default_num_workers(device) == workers
    assert default_prefetch(device, workers) == prefetch


def test_rerun_same_config_is_noop_and_other_config_refused(tiny_dir, tmp_path, backbone):
    out = tmp_path / "f"
    extract(tiny_dir, out, _cfg(), backbone=backbone)
    before = embedx.read_features(out).embeddings.copy()
    r = extract(tiny_dir, out, _cfg(), backbone=backbone)
    assert r.num_skipped == 24
    with pytest.raises(OutputExistsError, match="normalized"):
        extract(tiny_dir, out, _cfg(normalize=True), backbone=backbone)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        extract(tiny_dir, out, _cfg(model="test_efficientnet", weights="random"))
    np.testing.assert_array_equal(embedx.read_features(out).embeddings, before)  # nothing lost
    extract(tiny_dir, out, _cfg(normalize=True, overwrite=True), backbone=backbone)
    f = embedx.read_features(out)
    np.testing.assert_allclose(np.linalg.norm(f.embeddings, axis=1), 1.0, rtol=1e-5)
    assert f.metadata["normalized"] is True


def test_missing_and_damaged_shards_are_named_and_embedded_again(tiny_dir, tmp_path, backbone, caplog):
    """A shard file deleted, truncated, or with its data overwritten: readers name the file and
    what to do (not pyarrow's bare ArrowInvalid); a rerun of the extract embeds the rows of the
    missing and the visibly damaged ones again (not "nothing to do"), keeping the damaged file
    aside. The result equals the first run's."""
    from embedx.errors import DamagedFileError

    out = tmp_path / "f"
    extract(tiny_dir, out, _cfg(shard_size=8), backbone=backbone)
    first = embedx.read_features(out)
    (out / "part-00001.parquet").unlink()
    with pytest.raises(DamagedFileError, match=r"part-00001.parquet is missing .*Rerun the `embedx extract`"):
        embedx.read_features(out)
    data = (out / "part-00002.parquet").read_bytes()
    (out / "part-00002.parquet").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="embedx.extractor"):
        r = extract(tiny_dir, out, _cfg(shard_size=8), backbone=backbone)
    assert r.num_skipped == 8 and r.num_embedded == 24
    assert "part-00001.parquet is missing: its 8 rows are embedded again" in caplog.text
    assert "part-00002.parquet is damaged (" in caplog.text and "kept as part-00002.parquet.damaged" in caplog.text
    assert (out / "part-00002.parquet.damaged").read_bytes() == data[: len(data) // 2]
    again = embedx.read_features(out)
    assert again.paths == first.paths
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    # damage past the footer: readers say which file, and to delete it before the rerun
    good = (out / "part-00000.parquet").read_bytes()
    (out / "part-00000.parquet").write_bytes(good[:200] + bytes(len(good) - 400) + good[-200:])
    with pytest.raises(DamagedFileError, match=r"part-00000.parquet cannot be read as Parquet .*Delete it, then"):
        list(shards.iter_shards(out))
    (out / "part-00000.parquet").unlink()
    assert extract(tiny_dir, out, _cfg(shard_size=8), backbone=backbone).num_skipped == 16
    np.testing.assert_array_equal(embedx.read_features(out).embeddings, first.embeddings)
    (out / "errors.parquet").write_bytes(b"not parquet")  # made from the manifest: made again
    assert extract(tiny_dir, out, _cfg(shard_size=8), backbone=backbone).num_skipped == 24
    assert shards.read_errors(out).num_rows == 0


def test_float16_storage(tiny_dir, tmp_path, backbone):
    extract(tiny_dir, tmp_path / "f", _cfg(dtype="float16"), backbone=backbone)
    t = pq.read_table(tmp_path / "f" / "part-00000.parquet")
    assert t.schema.field("embedding").type.value_type == pa.float16()
    extract(tiny_dir, tmp_path / "g", _cfg(), backbone=backbone)
    a, b = embedx.read_features(tmp_path / "f").embeddings, embedx.read_features(tmp_path / "g").embeddings
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_concurrent_writer_refused(tiny_dir, tmp_path, backbone):
    out = tmp_path / "f"
    out.mkdir()
    with shards.DirectoryLock(out):
        with pytest.raises(LockedError, match="Another embedx process"):
            extract(tiny_dir, out, _cfg(), backbone=backbone)


def test_out_of_memory_batch_is_split_and_retried(tiny_dir, tmp_path, backbone):
    import torch

    from embedx.backbone import Backbone

    class OomAbove4(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.sizes = []

        def forward(self, x):
            self.sizes.append(x.shape[0])
            if x.shape[0] > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    wrapped = OomAbove4(backbone.model)
    bb = Backbone(wrapped, backbone.model_name, backbone.weights_source, backbone.weights_sha256,
                  backbone.data_config, backbone.dim, backbone.pooling)
    # the model as it is (fp32, fold_bn=False): the run must call this wrapper itself, not a copy
    # of it (folded, or with bf16 weights)
    plain = dict(precision="fp32", fold_bn=False)
    r = extract(tiny_dir, tmp_path / "oom", _cfg(batch_size=16, **plain), backbone=bb)
    assert r.num_embedded == 24 and max(s for s in wrapped.sizes if s <= 4) == 4 and 16 in wrapped.sizes
    extract(tiny_dir, tmp_path / "ref", _cfg(batch_size=4, **plain), backbone=backbone)
    np.testing.assert_allclose(embedx.read_features(tmp_path / "oom").embeddings,
                               embedx.read_features(tmp_path / "ref").embeddings, rtol=1e-4, atol=1e-4)


def test_real_photos_crops_of_same_photo_are_closer(tmp_path, backbone):
    from PIL import Image

    from .conftest import real_photo

    d = tmp_path / "crops"
    d.mkdir()
    names = ("chelsea", "coffee", "astronaut", "rocket")
    for name in names:
        img = real_photo(name)
        h, w = img.shape[:2]
        Image.fromarray(img[: int(h * 0.85), : int(w * 0.85)]).save(d / f"{name}_a.jpg")
        Image.fromarray(img[h - int(h * 0.85):, w - int(w * 0.85):]).save(d / f"{name}_b.jpg")
    extract(d, tmp_path / "f", _cfg(normalize=True, labels="none"), backbone=backbone)
    f = embedx.read_features(tmp_path / "f")
    sim = f.embeddings @ f.embeddings.T
    idx = {p: i for i, p in enumerate(f.paths)}
    same = [sim[idx[f"{n}_a.jpg"], idx[f"{n}_b.jpg"]] for n in names]
    diff = [sim[idx[f"{a}_a.jpg"], idx[f"{b}_b.jpg"]] for a in names for b in names if a != b]
    assert min(same) > max(diff), (same, diff)


def _run_cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "embedx", *args], env=env, **kw)


def test_killed_run_resumes_to_identical_output(tmp_path):
    """kill -9 a real CLI run mid-way, rerun the same command, compare with an uninterrupted run."""
    from PIL import Image

    from .conftest import make_shapes_image

    src = tmp_path / "imgs"
    rng = np.random.default_rng(5)
    for i in range(120):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_shapes_image(rng, i % 2)).save(src / f"c{i % 2}" / f"{i:04d}.jpg")
    args = ["extract", str(src), "--batch-size", "1", "--num-workers", "0", "--shard-size", "8", "--no-progress"]
    out = tmp_path / "killed"
    proc = _run_cli([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    manifest = None
    while time.time() < deadline:
        manifest = shards.read_manifest(out) if (out / "manifest.json").exists() else None
        if manifest and len(manifest["shards"]) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert manifest is not None and len(manifest["shards"]) >= 2
    partial = shards.read_manifest(out)
    assert not partial["complete"] and len(partial["shards"]) < 15, "the run finished before it was killed"
    done_before = len(partial["shards"])
    resumed = _run_cli([*args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "done by an earlier run" in stdout
    assert "ended without cleaning up" in stderr  # the kill is noticed (and its images checked first)
    ref = tmp_path / "ref"
    full = _run_cli([*args, "--out", str(ref)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = full.communicate(timeout=300)
    assert full.returncode == 0, stderr
    a, b = embedx.read_features(out), embedx.read_features(ref)
    assert len(a) == 120 and a.row_ids.tolist() == b.row_ids.tolist() == list(range(120))
    assert a.paths == b.paths and a.labels == b.labels
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(p.name for p in ref.glob("part-*.parquet"))
    assert not list(Path(out).glob(".*.tmp"))
    assert done_before >= 2


def test_an_in_process_decoder_crash_is_found_by_the_rerun(tiny_dir, tmp_path):
    """On 2 cores images are decoded in the extract process itself: a decoding library that
    segfaults on an image kills the run. The rerun sees that the last run did not exit cleanly
    and decodes its next images in a separate process first: the image is recorded as a
    `decoder_crashed` error and the run completes (before: it died again, at every rerun). A
    clean exit (here: the completed rerun) leaves nothing for the next run to check."""
    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))
    code = segfault_on("embedx._loader", files[9]) + f"""
from embedx.extractor import ExtractConfig, extract
r = extract([{str(tiny_dir)!r}], {str(tmp_path / "f")!r},
            ExtractConfig(progress=False, num_workers=0, batch_size=4, shard_size=8))
print(r.num_embedded, r.num_errors)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGSEGV, first.stderr[-2000:]
    assert not shards.read_manifest(tmp_path / "f")["complete"]
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split() == ["23", "1"]
    assert "ended without cleaning up" in again.stderr
    (err,) = shards.read_errors(tmp_path / "f").to_pylist()
    assert err["path"] == os.path.relpath(files[9], str(tiny_dir.resolve()))
    assert err["error"] == "decoder_crashed" and "SIGSEGV" in err["message"]
    third = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert third.returncode == 0 and "ended without cleaning up" not in third.stderr, third.stderr[-2000:]


def test_uint8_resize_matches_timms_pil_transform_on_real_photos(backbone):
    """The decoders' default resize + crop (uint8 tensors) gives timm's PIL pixels to within a
    grey level or two, on real photos of several sizes and aspect ratios."""
    from embedx._loader import UInt8ResizeCrop
    from embedx.demo_data import PHOTOS, load_photo

    fast, ref = backbone.worker_transform(True), backbone.worker_transform(False)
    assert isinstance(fast, UInt8ResizeCrop) and not isinstance(ref, UInt8ResizeCrop)
    for name in PHOTOS:
        im = load_photo(name)
        for size in (im.size, (500, 375), (375, 500), (300, 300)):
            img = im.resize(size)
            a = fast(img).astype(int)
            b = np.asarray(ref(img)).astype(int)
            assert a.shape == b.shape == (224, 224, 3)
            assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05, (name, size)


def test_fast_decode_embeddings_close_to_exact(photo_dir, tmp_path, backbone):
    """Default decode (PIL draft + uint8 resize) vs timm's exact transform: same rows, cosine
    >= 0.999, and the shards say which one made them."""
    a = extract(photo_dir, tmp_path / "fast", _cfg(normalize=True), backbone=backbone)
    b = extract(photo_dir, tmp_path / "exact", _cfg(fast_decode=False, normalize=True), backbone=backbone)
    fa, fb = embedx.read_features(tmp_path / "fast"), embedx.read_features(tmp_path / "exact")
    assert a.num_embedded == b.num_embedded and fa.paths == fb.paths
    assert fa.metadata["decode"] == "pil-draft2x+uint8-resize" and fb.metadata["decode"] == "pil"
    cos = (fa.embeddings * fb.embeddings).sum(1)
    assert cos.min() >= 0.999, cos


def test_device_share_splits_jpegs_between_device_and_cpu_decoders(photo_dir, tmp_path, backbone):
    """--decode device --device-share 0.5: the device decodes about half of the JPEGs (a fixed set,
    by row id) while the CPU workers decode the rest; each row equals the run that decoded it the
    same way, and the metadata says both decoders ran."""
    from embedx._loader import DecodeSpec

    spec = DecodeSpec(None, (3, 224, 224), None, decode="device", device_share=0.5)
    share = np.mean([spec.on_device(r) for r in range(1000)])
    assert 0.45 < share < 0.55
    # by row id, not by position in the dataset: a resumed run (a suffix of the listing) sends the
    # same rows to the device as the first run did
    from embedx._loader import ImageDataset
    from embedx.images import list_images

    rest = list_images([photo_dir]).records[3:]
    ds = ImageDataset(rest, backbone.decode_spec(decode="device", device_share=0.5))
    kinds = [ds[i][4] == "encoded" for i in range(len(rest))]
    assert kinds == [spec.on_device(r.row_id) for r in rest] != [spec.on_device(i) for i in range(len(rest))]

    hyb = embedx.read_features(extract(photo_dir, tmp_path / "hyb", _cfg(decode="device", device_share=0.5),
                                       backbone=backbone).out_dir)
    dev = embedx.read_features(extract(photo_dir, tmp_path / "dev", _cfg(decode="device"), backbone=backbone).out_dir)
    cpu = embedx.read_features(extract(photo_dir, tmp_path / "cpu", _cfg(), backbone=backbone).out_dir)
    assert hyb.metadata["decode"] == "torchcodec-device@0.50+pil-draft2x+uint8-resize"
    assert hyb.paths == dev.paths == cpu.paths
    on_dev = np.array([spec.on_device(int(r)) for r in hyb.row_ids])
    assert 0 < on_dev.sum() < len(on_dev)
    np.testing.assert_allclose(hyb.embeddings[on_dev], dev.embeddings[on_dev], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hyb.embeddings[~on_dev], cpu.embeddings[~on_dev], rtol=1e-4, atol=1e-4)
    # and the two decoders really differ, so the comparison above says which one made each row
    assert np.abs(dev.embeddings[~on_dev] - cpu.embeddings[~on_dev]).max() > 1e-3


@pytest.mark.parametrize("kwargs, engine, message", [
    ({"device_share": 0.5}, "local", "needs --decode device"),
    ({"decode": "device", "device_share": 0.0}, "local", r"must be in \(0, 1\]"),
    ({"decode": "device"}, "ray", "leave out --decode device"),
    ({"heap": "jemalloc"}, "local", "--heap must be one of auto, keep, release"),
])
def test_decode_options_that_do_not_fit_are_refused_before_any_work(tiny_dir, tmp_path, kwargs, engine, message):
    from embedx.errors import InputError

    with pytest.raises(InputError, match=message):
        extract(tiny_dir, tmp_path / "out", _cfg(**kwargs), engine=engine)
    assert not (tmp_path / "out").exists()


def test_default_cpu_batch_follows_the_cpu(monkeypatch):
    """2 images a thread on AVX2 CPUs, 8 with AVX-512 (measured: see default_batch_size)."""
    import torch

    from embedx.extractor import default_batch_size

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for capability, want in (("AVX2", 4), ("DEFAULT", 4), ("AVX512", 16)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert default_batch_size("cpu") == want, capability
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert default_batch_size("cpu") == 32 and default_batch_size("cuda") == 256


def test_cpu_has_amx_says_what_the_cpu_has():
    """The AMX probe behind --compile auto's bf16 rule agrees with the kernel's CPU flags."""
    from embedx.extractor import cpu_has_amx

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo here")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    assert cpu_has_amx() == ("amx_tile" in flags)


def test_compile_auto_follows_length_device_and_precision(tiny_dir, tmp_path, backbone, monkeypatch):
    """--compile auto compiles long runs, on a CPU in fp32, and in bf16 only on CPUs with AMX
    (elsewhere the compiled bf16 model was slower, or with freezing less accurate:
    bench_extract.py --compile); yes/no are obeyed; the rule and the CPU's compile options reach
    the engine."""
    import torch

    from embedx import extractor
    from embedx.errors import InputError

    n = extractor.COMPILE_MIN_IMAGES["cpu"]
    assert extractor.should_compile("auto", "cpu", n, "fp32")
    assert not extractor.should_compile("auto", "cpu", n - 1, "fp32")
    monkeypatch.setattr(extractor, "cpu_has_amx", lambda: True)
    assert extractor.should_compile("auto", "cpu", n, "bf16") and not extractor.should_compile("auto", "cpu", n - 1, "bf16")
    monkeypatch.setattr(extractor, "cpu_has_amx", lambda: False)  # from here on: a CPU without AMX
    assert not extractor.should_compile("auto", "cpu", 10 * n, "bf16")
    assert extractor.should_compile("auto", "cpu", n, "fp32")
    assert extractor.should_compile("yes", "cpu", 1, "bf16") and not extractor.should_compile("no", "cpu", 10 * n)
    assert extractor.should_compile("auto", "cuda:0", extractor.COMPILE_MIN_IMAGES["cuda"], "bf16")
    with pytest.raises(InputError, match="auto, yes or no"):
        extractor.should_compile("always", "cpu", 1)

    import torch._inductor.config

    compiled, freezing = [], []

    def spy_compile(model):
        compiled.append(model)

        def call(x):  # what the compiled model would see: inductor's freezing flag while it traces
            freezing.append(torch._inductor.config.freezing)
            return model(x)
        return call

    monkeypatch.setattr(torch, "compile", spy_compile)
    monkeypatch.setitem(extractor.COMPILE_MIN_IMAGES, "cpu", 1)
    for precision in ("bf16", "fp32"):
        extract(tiny_dir, tmp_path / precision, ExtractConfig(precision=precision, progress=False), backbone=backbone)
    assert len(compiled) == 1  # the fp32 run only
    assert freezing and all(freezing)  # with inductor's freezing on a CPU in fp32 ...
    assert not torch._inductor.config.freezing  # ... around its calls only


def test_the_models_checked_changes_are_made_before_the_decoder_processes_start(tiny_dir, tmp_path, backbone,
                                                                                  monkeypatch):
    """The fp32 stem's check (CPU forward passes) ran after the decoder processes had started: on
    the H200 machine, beside 15 busy decoders, start-up took 2-5 s instead of ~0.4 (session 15).
    The model is prepared first, the decoders start, then it goes to the device."""
    import embedx._loader as loader_module
    import embedx.extractor as extractor

    order = []
    real_prepare, real_place, real_make = extractor._prepare_model, extractor._place, loader_module.make_loader

    def prepare(*args, **kwargs):
        order.append(("prepare", kwargs.get("place", True)))
        return real_prepare(*args, **kwargs)

    def place(*args, **kwargs):
        order.append(("place",))
        return real_place(*args, **kwargs)

    class Loader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            order.append(("decoders start",))
            return iter(self.loader)

    monkeypatch.setattr(extractor, "_prepare_model", prepare)
    monkeypatch.setattr(extractor, "_place", place)
    monkeypatch.setattr(loader_module, "make_loader", lambda *a, **k: Loader(real_make(*a, **k)))
    r = extract(tiny_dir, tmp_path / "o", ExtractConfig(num_workers=2, progress=False), backbone=backbone)
    assert r.num_embedded > 0
    assert order == [("prepare", False), ("decoders start",), ("place",)]


def test_a_shards_rows_are_stacked_on_the_writer_thread(tiny_dir, tmp_path, backbone, monkeypatch):
    """Stacking a full shard's rows (80 MB of 2048-d rows) held the engine's main thread ~0.05-0.2 s
    a shard; it is the writer thread's work now, beside compressing and writing the shard."""
    import threading

    import embedx.extractor as extractor

    threads, real_stack = [], np.stack

    def stack(arrays, *args, **kwargs):  # (numpy's own: other stacks, of pixels, are left out below)
        arrays = list(arrays)
        if arrays and np.ndim(arrays[0]) == 1 and len(arrays[0]) == backbone.dim:  # embedding rows
            threads.append(threading.current_thread().name)
        return real_stack(arrays, *args, **kwargs)

    monkeypatch.setattr(extractor.np, "stack", stack)
    r = extract(tiny_dir, tmp_path / "o", ExtractConfig(shard_size=4, progress=False), backbone=backbone)
    monkeypatch.undo()
    assert r.num_embedded > 4 and threads and all(t.startswith("embedx-shard-writer") for t in threads), threads
    f = embedx.read_features(tmp_path / "o")
    assert f.embeddings.shape == (r.num_embedded, backbone.dim) and list(f.row_ids) == sorted(f.row_ids)


def test_a_run_begun_all_bf16_is_told_how_to_go_on(tiny_dir, tmp_path, backbone):
    """The fp32 stem became the default on GPUs too: a run begun there before, all in bf16, would
    be refused on resume as another configuration; the error says which flag goes on with it."""
    cfg = ExtractConfig(precision="bf16", fp32_stem=False, progress=False, shard_size=8, num_workers=0)
    extract(tiny_dir, tmp_path / "o", cfg, backbone=backbone)
    manifest = shards.read_manifest(tmp_path / "o")
    manifest["complete"] = False
    manifest["shards"] = manifest["shards"][:1]  # interrupted after its first shard
    shards.write_manifest(tmp_path / "o", manifest)
    with pytest.raises(OutputExistsError, match="(?s)fp32_modules.*add --no-fp32-stem to go on"):
        extract(tiny_dir, tmp_path / "o", ExtractConfig(precision="bf16", progress=False, shard_size=8,
                                                      num_workers=0), backbone=backbone)
    r = extract(tiny_dir, tmp_path / "o", cfg, backbone=backbone)  # with the flag it resumes
    assert r.num_embedded == 24 and r.num_skipped == 8
