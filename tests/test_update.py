"""`extract --update`: a grown input is embedded incrementally, as new shards, and an index
catches up with `index add`."""

import shutil

import numpy as np
import pytest

import embedx
from embedx import shards
from embedx.errors import EmbedxError, InputError, OutputExistsError, SearchIndexError
from embedx.extractor import ExtractConfig, extract

FAST = dict(progress=False, num_workers=0, batch_size=8, shard_size=4)


def _cfg(**kw):
    return ExtractConfig(**{**FAST, **kw})


def _copy(tiny_dir, dst, names):
    for n in names:
        (dst / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_dir / n, dst / n)


def _names(tiny_dir):
    return sorted(str(p.relative_to(tiny_dir)) for p in tiny_dir.rglob("*.*"))


def _interrupted_at_second_shard(monkeypatch, run) -> None:
    """`run()` with its second shard write failing (disk full, simulated): it must raise; shard
    writes work again afterwards."""
    real_write, calls = shards.write_shard, []

    def failing_write(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write(*args, **kw)

    monkeypatch.setattr(shards, "write_shard", failing_write)
    with pytest.raises((EmbedxError, OSError)):
        run()
    monkeypatch.setattr(shards, "write_shard", real_write)


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def test_update_embeds_only_new_images_into_new_shards(tiny_dir, tmp_path, backbone):
    from embedx.indexer import add_to_index, build_index
    from embedx.index import IndexConfig
    from embedx.query import SearchIndex, search_ids

    names = _names(tiny_dir)  # 24 images in class_0..2
    src, out = tmp_path / "src", tmp_path / "feats"
    first = [n for n in names if not n.startswith("class_2")][:10]
    _copy(tiny_dir, src, first)
    r = extract(src, out, _cfg(), backbone=backbone)
    assert (r.num_images, r.num_embedded) == (10, 10)
    build_index(out, tmp_path / "idx", IndexConfig(factory="Flat", num_queries=5))
    before = _shard_bytes(out)
    old = embedx.read_features(out)

    # the folder grows (more of one class, and a new one) and loses one image
    later = [n for n in names if n not in first][:7]
    _copy(tiny_dir, src, later)
    (src / first[3]).unlink()
    with pytest.raises(OutputExistsError, match=r"lacks 7 of the input's images \(it holds the other 9\).*--update"):
        extract(src, out, _cfg(), backbone=backbone)
    assert _shard_bytes(out) == before  # the refusal wrote nothing

    r = extract(src, out, _cfg(update=True), backbone=backbone)
    assert (r.num_added, r.num_gone, r.num_relabelled) == (7, 1, 0)
    assert (r.num_images, r.num_embedded, r.num_errors, r.num_skipped, r.num_done) == (17, 17, 0, 10, 7)
    after = _shard_bytes(out)
    assert {k: v for k, v in after.items() if k in before} == before  # no shard rewritten
    assert sorted(set(after) - set(before)) == ["part-00003.parquet", "part-00004.parquet"]

    f = embedx.read_features(out)
    # old rows as they were (the removed image's row too); new rows from the next shard boundary
    assert f.row_ids.tolist() == list(range(10)) + list(range(12, 19))
    assert f.paths[:10] == old.paths and np.array_equal(f.embeddings[:10], old.embeddings)
    new_paths = sorted(str((src / n).relative_to(src)) for n in later)
    assert f.paths[10:] == new_paths and f.labels[10:] == [p.split("/")[0] for p in new_paths]
    # each new row equals a fresh run over the grown folder
    ref = embedx.read_features(extract(src, tmp_path / "ref", _cfg(), backbone=backbone).out_dir)
    at = {p: i for i, p in enumerate(ref.paths)}
    np.testing.assert_allclose(f.embeddings[10:], ref.embeddings[[at[p] for p in new_paths]], rtol=1e-5, atol=1e-5)
    assert embedx.shards.read_manifest(out)["complete"]
    from embedx.summary import describe

    d = describe(out)
    assert (d["rows"], d["num_images"], d["updates"], d["shards"], d["complete"]) == (17, 17, 1, 5, True)

    # reruns: with or without --update, nothing new, nothing done, no error
    for update in (True, False):
        again = extract(src, out, _cfg(update=update), backbone=backbone)
        assert (again.num_done, again.num_added, again.num_skipped, again.num_gone) == (0, 0, 17, 1)
    assert _shard_bytes(out) == after

    # the index catches up with the grown directory; a second add finds nothing
    info = add_to_index(tmp_path / "idx", out)
    assert info["added"] == 7 and info["num_vectors"] == 17 and info["sources"][0]["rows"] == 17
    [hit] = search_ids(SearchIndex(tmp_path / "idx"), [15], k=1)
    assert hit.neighbors[0].row_id == 15 and hit.neighbors[0].path == f.paths[f.row_ids.tolist().index(15)]
    assert add_to_index(tmp_path / "idx", out)["added"] == 0
    # an id query reads back only the shard that holds the row
    assert shards.files_for_rows(out, [15]) == [out / "part-00003.parquet"]
    assert shards.files_for_rows(out, [1, 16]) == [out / "part-00000.parquet", out / "part-00004.parquet"]
    # --overwrite starts over: one segment, the updates' plans gone
    r = extract(src, out, _cfg(overwrite=True), backbone=backbone)
    assert r.num_images == 16 and not list((out / "segments").glob("*.parquet"))
    assert "segments" not in shards.read_manifest(out)
    # the index over the old rows now names a row the shards lack: a Flat index holds the row's
    # vector itself and answers from it; read from the shards, it is said, not answered with garbage
    idx = SearchIndex(tmp_path / "idx")
    [hit] = search_ids(idx, [17], k=1)
    assert hit.neighbors[0].row_id == 17 and hit.neighbors[0].score > 0.999
    with pytest.raises(SearchIndexError, match=r"Row ids \[17\] are no longer in their feature shards"):
        idx.shard_vectors([idx.position_of(17)])
    # and a catch-up would add rows whose ids meant other images: refused
    with pytest.raises(SearchIndexError, match="extracted again"):
        add_to_index(tmp_path / "idx", out)


def test_interrupted_update_resumes_its_planned_rows(tiny_dir, tmp_path, backbone, monkeypatch):
    names = _names(tiny_dir)
    src, out = tmp_path / "src", tmp_path / "feats"
    _copy(tiny_dir, src, names[:6])
    extract(src, out, _cfg(), backbone=backbone)  # rows 0-5, shards 0-1
    _copy(tiny_dir, src, names[6:16])  # 10 new: rows 8-17, shards 2-4

    real_write = shards.write_shard
    _interrupted_at_second_shard(monkeypatch, lambda: extract(src, out, _cfg(update=True), backbone=backbone))
    m = shards.read_manifest(out)
    assert not m["complete"] and sorted(s["index"] for s in m["shards"]) == [0, 1, 2]
    assert m["segments"] == [{"first_row": 0, "num_images": 6}, {"first_row": 8, "num_images": 10}]

    # more images arrive before the rerun: the unfinished update keeps its rows, the newer
    # images get a segment of their own after it; that rerun is interrupted too, before any
    # shard: two unfinished updates
    _copy(tiny_dir, src, names[16:20])
    monkeypatch.setattr(shards, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises((EmbedxError, OSError)):
        extract(src, out, _cfg(update=True), backbone=backbone)
    monkeypatch.setattr(shards, "write_shard", real_write)
    m = shards.read_manifest(out)
    assert m["segments"][2] == {"first_row": 20, "num_images": 4} and sorted(s["index"] for s in m["shards"]) == [0, 1, 2]
    r = extract(src, out, _cfg(update=True), backbone=backbone)
    assert (r.num_added, r.num_images, r.num_embedded, r.num_skipped) == (0, 20, 20, 10)
    f = embedx.read_features(out)
    assert f.row_ids.tolist() == list(range(6)) + list(range(8, 18)) + list(range(20, 24))
    assert f.paths == sorted(f.paths[:6]) + sorted(f.paths[6:16]) + sorted(f.paths[16:])
    assert sorted(f.paths) == sorted(names[:20]) and len(set(f.paths)) == 20
    ref = embedx.read_features(extract(src, tmp_path / "ref", _cfg(), backbone=backbone).out_dir)
    at = {p: i for i, p in enumerate(ref.paths)}
    np.testing.assert_allclose(f.embeddings, ref.embeddings[[at[p] for p in f.paths]], rtol=1e-5, atol=1e-5)


def test_update_refusals(tiny_dir, tmp_path, backbone, monkeypatch):
    names = _names(tiny_dir)
    src, out = tmp_path / "src", tmp_path / "feats"
    _copy(tiny_dir, src, names[:10])
    with pytest.raises(InputError, match="Pick one"):
        extract(src, out, _cfg(update=True, overwrite=True), backbone=backbone)
    # another configuration is not an update
    extract(src, out, _cfg(), backbone=backbone)
    _copy(tiny_dir, src, names[10:12])
    with pytest.raises(OutputExistsError, match="normalized"):
        extract(src, out, _cfg(update=True, normalize=True), backbone=backbone)
    with pytest.raises(OutputExistsError, match="shard_size"):
        extract(src, out, _cfg(update=True, shard_size=5), backbone=backbone)

    # a first run that did not finish cannot be updated with a changed input
    out2 = tmp_path / "feats2"
    real_write = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises((EmbedxError, OSError)):
        extract(src, out2, _cfg(), backbone=backbone)
    monkeypatch.setattr(shards, "write_shard", real_write)
    _copy(tiny_dir, src, names[12:13])
    with pytest.raises(OutputExistsError, match="has not finished.*Finish it first"):
        extract(src, out2, _cfg(update=True), backbone=backbone)
    assert extract(src, out2, _cfg(overwrite=True), backbone=backbone).num_embedded == 13

    # a second folder passed beside the first moves the root up: every path is named anew, so
    # nothing matches, and "adding" would embed everything twice: refused
    more = tmp_path / "more"
    _copy(tiny_dir, more, names[20:22])
    with pytest.raises(OutputExistsError, match=r"None of the input's 15 images is in .* which holds 13"):
        extract([src, more], out2, _cfg(update=True), backbone=backbone)
    # extracting that folder into its own --out is the way (and index add both)
    assert extract(more, tmp_path / "more-feats", _cfg(), backbone=backbone).num_embedded == 2


def test_retry_errors_embeds_mended_inputs_and_keeps_one_record_per_path(tiny_dir, tmp_path, backbone):
    names = _names(tiny_dir)
    src, out = tmp_path / "src", tmp_path / "feats"
    _copy(tiny_dir, src, names[:9])
    good = {n: (src / n).read_bytes() for n in names[:9]}
    broken = [n for n in names[:9] if n.endswith(".jpg")][:3]
    for n in broken:
        (src / n).write_bytes(good[n][:40])  # truncated: an error row each
    r = extract(src, out, _cfg(), backbone=backbone)
    assert (r.num_embedded, r.num_errors) == (6, 3)

    # two are mended (the storage hiccup is over), one stays broken; one new image arrives
    for n in broken[:2]:
        (src / n).write_bytes(good[n])
    _copy(tiny_dir, src, names[9:10])
    with pytest.raises(OutputExistsError, match="--update"):  # a new image still needs --update
        extract(src, out, _cfg(retry_errors=True), backbone=backbone)
    r = extract(src, out, _cfg(retry_errors=True, update=True), backbone=backbone)
    assert (r.num_retried, r.num_added) == (3, 1)
    assert (r.num_images, r.num_embedded, r.num_errors, r.num_done) == (10, 9, 1, 4)
    f = embedx.read_features(out)
    errors = shards.read_errors(out).to_pydict()
    assert errors["path"] == [broken[2]] and errors["row_id"][0] >= 12  # the retry's error row, in the new segment
    assert sorted(f.paths) == sorted(set(names[:10]) - {broken[2]})
    assert sorted(f.paths + errors["path"]) == sorted(names[:10])  # one record per path
    ref = embedx.read_features(extract(src, tmp_path / "ref", _cfg(), backbone=backbone).out_dir)
    at = {p: i for i, p in enumerate(ref.paths)}
    np.testing.assert_allclose(f.embeddings, ref.embeddings[[at[p] for p in f.paths]], rtol=1e-5, atol=1e-5)
    from embedx.summary import describe

    d = describe(out)
    assert (d["rows"], d["errors"], d["num_images"]) == (9, 1, 10)
    # nothing left to retry but the broken one: it is tried again, and stays an error
    again = extract(src, out, _cfg(retry_errors=True), backbone=backbone)
    assert (again.num_retried, again.num_done, again.num_errors) == (1, 1, 1)
    assert shards.read_errors(out).num_rows == 1 and len(embedx.read_features(out)) == 9


def test_a_run_recorded_by_an_older_embedx_resumes_and_updates(tiny_dir, tmp_path, backbone, monkeypatch):
    """Metadata keys a newer embedx records (here fp32_modules) are not held against a run that
    an older one began: it resumes, and takes --update, instead of 'a different configuration'."""
    from embedx import extractor

    names = _names(tiny_dir)
    src, out = tmp_path / "src", tmp_path / "feats"
    _copy(tiny_dir, src, names[:10])
    newer = extractor.provenance
    monkeypatch.setattr(extractor, "provenance",
                        lambda *a, **k: {key: v for key, v in newer(*a, **k).items() if key != "fp32_modules"})
    # the older embedx, interrupted
    _interrupted_at_second_shard(monkeypatch, lambda: extract(src, out, _cfg(precision="bf16"), backbone=backbone))
    monkeypatch.undo()
    assert "fp32_modules" not in shards.read_manifest(out)["metadata"]
    r = extract(src, out, _cfg(precision="bf16"), backbone=backbone)  # this one: resumes
    assert (r.num_images, r.num_embedded, r.num_skipped) == (10, 10, 4)
    _copy(tiny_dir, src, names[10:14])
    r = extract(src, out, _cfg(precision="bf16", update=True), backbone=backbone)
    assert (r.num_added, r.num_embedded) == (4, 14)
    # a difference in a key both runs recorded is still refused
    with pytest.raises(OutputExistsError, match="precision"):
        extract(src, out, _cfg(precision="fp32", update=True), backbone=backbone)
