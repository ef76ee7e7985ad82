import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import embedx
from embedx import index as fx
from embedx import shards
from embedx.cli import app
from embedx.errors import FeaturesError, InputError, SearchIndexError, WeightsError
from embedx.extractor import ExtractConfig, extract
from embedx.indexer import add_to_index, build_index
from embedx.query import SearchIndex, search_ids, search_images

from .conftest import clustered


def write_features(directory, x, labels=None, shard_size=5000, meta=None, start_id=0):
    """Synthetic shard directory in the real format (no model involved)."""
    directory.mkdir(parents=True, exist_ok=True)
    n, dim = x.shape
    meta = meta or {"model": "synthetic", "weights_sha256": "0" * 64, "data_config": {}, "pooling": "avg",
                    "dim": dim, "dtype": "float32", "normalized": False}
    manifest = {"shards": [], "root": str(directory), "complete": True, "num_images": n}
    for s, lo in enumerate(range(0, n, shard_size)):
        hi = min(n, lo + shard_size)
        rows = shards.ShardRows(np.arange(lo, hi) + start_id, [f"img/{i:07d}.jpg" for i in range(lo, hi)],
                                [None if labels is None else str(labels[i]) for i in range(lo, hi)],
                                x[lo:hi], np.full(hi - lo, 64), np.full(hi - lo, 48))
        shards.write_shard(directory, s, rows, dim, "float32", meta)
        manifest["shards"].append({"index": s, "file": shards.shard_name(s), "rows": hi - lo, "errors": []})
    shards.write_manifest(directory, manifest)
    return directory


def brute_force(xb, xq, k, metric):
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    if metric == "l2":
        d = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
        return np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def test_choose_factory_follows_size_and_memory():
    G = 2**30
    assert fx.choose_factory(5_000, 512, 4 * G) == "Flat"
    assert fx.choose_factory(100_000, 512, 4 * G) == "HNSW32,Flat"
    assert fx.choose_factory(1_000_000, 512, 4 * G) == "IVF4096,Flat"
    assert fx.choose_factory(1_000_000, 512, 1 * G) == "IVF4096,SQ8"
    pq = fx.choose_factory(10_000_000, 512, 1 * G)
    assert re.fullmatch(r"(OPQ\d+,)?IVF\d+,PQ\d+", pq)
    with pytest.raises(SearchIndexError, match="--max-memory"):
        fx.choose_factory(10_000_000, 512, 10 * 2**20)
    assert fx.ivf_nlist(1000) <= 1000 / 39
    assert fx.parse_bytes("4G") == 4 * G and fx.parse_bytes("512M") == 512 * 2**20
    with pytest.raises(InputError):
        fx.parse_bytes("lots")


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_flat_index_equals_exact_search(tmp_path, metric):
    x, _ = clustered(3000, 24, 30, seed=1)
    feats = write_features(tmp_path / "f", x, shard_size=700)
    info = build_index(feats, tmp_path / "i", fx.IndexConfig(metric=metric, num_queries=200))
    assert info["factory"] == "Flat" and info["recall_at_k"] == 1.0
    idx = SearchIndex(tmp_path / "i")
    xq = x[:50] + 0.01
    res = idx.search(xq, k=5)
    got = np.array([[n.row_id for n in r.neighbors] for r in res])
    np.testing.assert_array_equal(got, brute_force(x, xq, 5, metric))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16,Flat", "IVF32,PQ8,RFlat"])
def test_approximate_indexes_reach_target_recall_measured_against_exact(tmp_path, factory):
    x, _ = clustered(20_000, 32, 200, seed=2, spread=0.5)
    feats = write_features(tmp_path / "f", x)
    info = build_index(feats, tmp_path / "i", fx.IndexConfig(factory=factory, target_recall=0.9, num_queries=300))
    assert info["factory"] == factory and info["search_param"] in ("nprobe", "efSearch")
    # recompute recall independently with numpy on fresh queries from the same distribution
    idx = SearchIndex(tmp_path / "i")
    rng = np.random.default_rng(9)
    xq = x[rng.choice(len(x), 200, replace=False)] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    got = np.array([[n.row_id for n in r.neighbors] for r in idx.search(xq, k=10)])
    recall = fx.recall_at_k(got, brute_force(x, xq, 10, "cosine"), 10)
    assert info["recall_at_k"] >= 0.9
    assert recall >= 0.85, recall
    assert info["sweep"][-1]["recall"] == info["recall_at_k"] and info["target_reached"]


def test_unreached_target_is_reported_not_hidden(tmp_path):
    x, _ = clustered(20_000, 32, 200, seed=2, spread=0.5)
    feats = write_features(tmp_path / "f", x)
    info = build_index(feats, tmp_path / "i", fx.IndexConfig(factory="IVF32,PQ4", target_recall=0.99, num_queries=300))
    assert not info["target_reached"] and info["recall_at_k"] < 0.99
    assert info["search_value"] == max(info["sweep"], key=lambda s: s["recall"])["value"]


def test_ivf_loads_memory_mapped(tmp_path):
    import faiss

    x, _ = clustered(5000, 16, 20, seed=3)
    feats = write_features(tmp_path / "f", x)
    build_index(feats, tmp_path / "i", fx.IndexConfig(factory="IVF16,Flat", num_queries=100))
    idx = SearchIndex(tmp_path / "i", mmap=True)
    ivf = faiss.extract_index_ivf(idx.index)
    assert "OnDisk" in type(faiss.downcast_InvertedLists(ivf.invlists)).__name__
    assert idx.search(x[:3], 1)[0].neighbors[0].row_id == 0


def test_index_add_and_provenance_check(tmp_path, capsys):
    x, _ = clustered(4000, 16, 20, seed=4)
    a = write_features(tmp_path / "a", x[:3000])
    b = write_features(tmp_path / "b", x[3000:], start_id=3000)
    build_index(a, tmp_path / "i", fx.IndexConfig(factory="IVF16,Flat", num_queries=100), progress=True)
    built = capsys.readouterr().err  # the bar names each step and counts every vector added
    assert "IVF16,Flat: training on 3,000 vectors" in built and "IVF16,Flat: adding" in built
    assert "3000/3000" in built and "measuring recall@10" in built
    info = add_to_index(tmp_path / "i", b, progress=True)
    assert "1000/1000" in capsys.readouterr().err
    assert info["num_vectors"] == 4000 and len(info["sources"]) == 2
    idx = SearchIndex(tmp_path / "i")
    [r] = search_ids(idx, [3500], k=1)
    assert r.neighbors[0].row_id == 3500
    again = add_to_index(tmp_path / "i", b)  # nothing new in b: nothing added, nothing counted twice
    assert again["added"] == 0 and again["num_vectors"] == 4000 and [s["rows"] for s in again["sources"]] == [3000, 1000]
    other = write_features(tmp_path / "c", x[:10, :8].copy())
    with pytest.raises(SearchIndexError, match="extracted differently"):
        add_to_index(tmp_path / "i", other)


def test_refusals(tmp_path):
    x, _ = clustered(500, 16, 5, seed=5)
    feats = write_features(tmp_path / "f", x)
    build_index(feats, tmp_path / "i", fx.IndexConfig(num_queries=50))
    idx = SearchIndex(tmp_path / "i")
    with pytest.raises(InputError, match="dimension"):
        idx.search(np.zeros((1, 8), np.float32))
    with pytest.raises(SearchIndexError, match="not in this index"):
        search_ids(idx, [999_999])
    with pytest.raises(SearchIndexError, match="already holds an index"):
        build_index(feats, tmp_path / "i")
    with pytest.raises(SearchIndexError, match="not an embedx index"):
        SearchIndex(tmp_path / "f")
    empty = write_features(tmp_path / "e", np.empty((0, 16), np.float32))
    with pytest.raises(FeaturesError):
        build_index(empty, tmp_path / "ei")
    with pytest.raises(WeightsError, match="randomly initialised"):
        # synthetic provenance says random weights: images cannot be embedded the same way
        meta = {**idx.provenance, "weights_source": "random", "model": "test_efficientnet"}
        from embedx.backbone import load_backbone_for

        load_backbone_for(meta)


def test_one_writer_at_a_time_per_index(tmp_path):
    """`index add` while another add (or a build) holds the index directory is refused, not
    allowed to overwrite the other's rows; an empty features directory makes no --out."""
    from embedx.errors import LockedError

    x, _ = clustered(200, 16, 3, seed=7)
    feats = write_features(tmp_path / "f", x)
    more = write_features(tmp_path / "g", x[:50], start_id=1000)
    build_index(feats, tmp_path / "i", fx.IndexConfig(num_queries=20))
    with shards.DirectoryLock(tmp_path / "i"):  # another process's build or add
        with pytest.raises(LockedError, match="Another embedx process is writing to"):
            add_to_index(tmp_path / "i", more)
        with pytest.raises(LockedError):
            build_index(feats, tmp_path / "i", overwrite=True)
    assert add_to_index(tmp_path / "i", more)["added"] == 50  # once it is free
    assert len(SearchIndex(tmp_path / "i")) == 250
    with pytest.raises(FeaturesError):
        build_index(tmp_path / "nothing-here", tmp_path / "j")
    assert not (tmp_path / "j").exists()


def test_damaged_index_files_say_how_to_rebuild(tmp_path):
    """A truncated index.faiss or rows.parquet, a garbled index.json: SearchIndexError naming the
    file and the command that rebuilds the index from its own sources (not FAISS's RuntimeError,
    pyarrow's ArrowInvalid or a JSONDecodeError traceback), for search and for index add."""
    import shutil

    x, _ = clustered(300, 16, 3, seed=6)
    feats = write_features(tmp_path / "f", x)
    build_index(feats, tmp_path / "i", fx.IndexConfig(num_queries=30))
    rebuild = f"Rebuild it: embedx index {feats} --out "
    for name, match in ((fx.INDEX_FILE, "cannot be read by FAISS"), (fx.ROWS_FILE, "cannot be read as Parquet")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(tmp_path / "i", broken)
        data = (broken / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2])
        for mmap in (True, False):
            with pytest.raises(SearchIndexError, match=f"{name} {match} .*{re.escape(rebuild)}"):
                SearchIndex(broken, mmap=mmap)
        with pytest.raises(SearchIndexError, match=re.escape(rebuild)):
            add_to_index(broken, feats)
    broken = tmp_path / "broken-json"
    shutil.copytree(tmp_path / "i", broken)
    (broken / fx.INFO_FILE).write_text("{")
    with pytest.raises(SearchIndexError, match="index.json is damaged"):
        SearchIndex(broken)
    assert len(SearchIndex(tmp_path / "i")) == 300  # the intact index still loads


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory, photo_dir, backbone):
    base = tmp_path_factory.mktemp("pidx")
    extract(photo_dir, base / "f", ExtractConfig(progress=False, num_workers=0, normalize=True), backbone=backbone)
    build_index(base / "f", base / "i", fx.IndexConfig(num_queries=50))
    return base


def test_query_image_finds_itself_first(photo_index, photo_dir):
    idx = SearchIndex(photo_index / "i")
    files = sorted(str(p) for p in photo_dir.rglob("*.jpg"))
    results, failures = search_images(idx, files, k=3)
    assert not failures and len(results) == len(files)
    for f, r in zip(files, results):
        assert f.endswith(r.neighbors[0].path) and r.neighbors[0].score > 0.999
    results, _ = search_images(idx, files, k=3, exclude_self=True)
    for f, r in zip(files, results):
        assert all(not f.endswith(n.path) for n in r.neighbors)


def test_cli_index_search_json_and_html(photo_index, photo_dir, tmp_path):
    runner = CliRunner()
    query = str(photo_dir / "chelsea" / "chelsea.jpg")
    html = tmp_path / "sheet.html"
    r = runner.invoke(app, ["search", str(photo_index / "i"), query, "-k", "3", "--format", "json", "--html", str(html)])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout[r.stdout.index("["):])
    assert payload[0]["query"] == query
    assert [x["rank"] for x in payload[0]["results"]] == [1, 2, 3]
    assert payload[0]["results"][0]["path"] == "chelsea/chelsea.jpg"
    page = html.read_text()
    assert page.count("<img src=\"data:image/jpeg;base64,") == 4  # query + 3 neighbours, all previewed
    for res in payload[0]["results"]:
        assert res["path"] in page
    r = runner.invoke(app, ["search", str(photo_index / "i"), "--id", "0", "--exclude-self", "--format", "csv", "-k", "2"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "query,rank,row_id,path,score" and len(lines) == 3 and ",0," not in lines[1][:12]
    np.save(tmp_path / "q.npy", embedx.read_features(photo_index / "f").embeddings[:2])
    r = runner.invoke(app, ["search", str(photo_index / "i"), "--vectors", str(tmp_path / "q.npy"), "-k", "1"])
    assert r.exit_code == 0 and "q.npy:1" in r.stdout


def test_dedup_finds_planted_duplicates(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    dup_of = {100: [101, 102], 500: [501], 1500: [1999]}
    for src, copies in dup_of.items():
        for c in copies:
            x[c] = x[src] + 0.01 * rng.standard_normal(32).astype(np.float32)
    feats = write_features(tmp_path / "f", x)
    build_index(feats, tmp_path / "i", fx.IndexConfig(num_queries=50))
    from embedx.dedup import find_duplicates, write_groups

    groups = find_duplicates(SearchIndex(tmp_path / "i"), threshold=0.99, k=5, batch_size=300)
    found = {}
    for g, rid in zip(groups.group, groups.row_ids):
        found.setdefault(int(g), set()).add(int(rid))
    assert sorted(map(sorted, found.values())) == sorted(sorted([s, *c]) for s, c in dup_of.items())
    out = write_groups(groups, tmp_path / "d.parquet")
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 7


def test_on_disk_ivf_merge_equals_in_memory_ivf_and_moves(tmp_path):
    import shutil

    x, _ = clustered(6000, 16, 30, seed=8)
    feats = write_features(tmp_path / "f", x, shard_size=1000)  # six shards -> six partial indexes
    cfg = dict(factory="IVF32,Flat", num_queries=200, target_recall=0.9)
    mem = build_index(feats, tmp_path / "mem", fx.IndexConfig(**cfg))
    disk = build_index(feats, tmp_path / "disk", fx.IndexConfig(**cfg, on_disk=True))
    assert disk["on_disk"] and (tmp_path / "disk" / fx.IVFDATA_FILE).exists()
    assert not list((tmp_path / "disk").glob(".blocks*"))
    assert disk["recall_at_k"] == mem["recall_at_k"] and disk["search_value"] == mem["search_value"]
    shutil.move(tmp_path / "disk", tmp_path / "moved")
    a, b = SearchIndex(tmp_path / "mem"), SearchIndex(tmp_path / "moved")
    xq = x[:100] + 0.01
    ra, rb = a.search(xq, 10), b.search(xq, 10)
    assert [[n.row_id for n in r.neighbors] for r in ra] == [[n.row_id for n in r.neighbors] for r in rb]
    with pytest.raises(SearchIndexError, match="on disk"):
        add_to_index(tmp_path / "moved", feats)
    with pytest.raises(SearchIndexError, match="needs an IVF"):
        build_index(feats, tmp_path / "hnsw", fx.IndexConfig(factory="HNSW16,Flat", on_disk=True))


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat"])
def test_label_filter_keeps_k_neighbours_of_a_rare_label(tmp_path, factory, monkeypatch):
    """--label: 1 % of the rows carry the label, scattered over every cluster, so the first
    neighbours of a query are almost never among them: the index is asked again for more. An
    HNSW graph over well-separated clusters does not reach the other clusters at all: the rows
    with the label are then searched exactly."""
    x, _ = clustered(5000, 16, 50, seed=3)
    rng = np.random.default_rng(3)
    labels = np.where(rng.random(len(x)) < 0.01, "rare", "common")
    labels[:2] = "other"
    feats = write_features(tmp_path / "f", x, labels=labels)
    build_index(feats, tmp_path / "i", fx.IndexConfig(factory=factory, num_queries=200, target_recall=0.95))
    exact_calls = []  # exact searches by the query (the build's recall measurement uses fx.knn too)
    real_knn = fx.knn
    monkeypatch.setattr(fx, "knn", lambda *a: exact_calls.append(1) or real_knn(*a))
    idx = SearchIndex(tmp_path / "i")
    xq = x[100:120] + 0.01
    rare = np.nonzero(labels == "rare")[0]
    got = idx.search(xq, k=5, labels=["rare"])
    assert all(len(r.neighbors) == 5 and {n.label for n in r.neighbors} == {"rare"} for r in got)
    exact = rare[brute_force(x[rare], xq, 5, "cosine")]
    ids = np.array([[n.row_id for n in r.neighbors] for r in got])
    if factory == "Flat":  # every row within reach: no exact fallback
        np.testing.assert_array_equal(ids, exact)
        assert exact_calls == []
    else:
        assert exact_calls == [1] and fx.recall_at_k(ids, exact, 5) >= 0.95
    # several labels: any of them; by row id, through the CLI
    both = idx.search(xq[:3], k=5, labels=["rare", "other"])
    assert all({n.label for n in r.neighbors} <= {"rare", "other"} for r in both)
    result = CliRunner().invoke(app, ["search", str(tmp_path / "i"), "--id", "100", "--label", "other", "-k", "3",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.output)
    assert [n["label"] for n in answer["results"]] == ["other", "other"]  # only two rows have it
    with pytest.raises(InputError, match="No indexed row has the label cat; the index has 3 labels: common, other, rare"):
        idx.search(xq, k=5, labels=["cat"])


def test_label_filter_bounds_what_it_asks_the_index_for(tmp_path, monkeypatch):
    """A label on 2 rows: k=3 gives those 2 from the index (fewer than k is all there is, not a
    reason for an exact search); a label too rare for the answer budget is searched exactly among
    its rows straight away, without asking the index."""
    import embedx.query as query

    x, _ = clustered(3000, 16, 30, seed=4)
    labels = np.array(["common"] * len(x), dtype=object)
    labels[[5, 2900]] = "pair"
    labels[::100] = np.where(labels[::100] == "common", "sparse", labels[::100])
    build_index(write_features(tmp_path / "f", x, labels=labels), tmp_path / "i", fx.IndexConfig(factory="Flat"))
    idx = SearchIndex(tmp_path / "i")
    asked, exact = [], []
    real_index, real_search, real_knn, real_stored = idx.index, idx.index.search, fx.knn, fx.stored_vectors
    monkeypatch.setattr(fx, "stored_vectors", lambda _spy, positions: real_stored(real_index, positions))
    monkeypatch.setattr(idx, "index", type("Spy", (), {
        "search": staticmethod(lambda xq, kk: asked.append(kk) or real_search(xq, kk)),
        "ntotal": idx.index.ntotal})())
    monkeypatch.setattr(fx, "knn", lambda *a: exact.append(1) or real_knn(*a))
    (r,) = idx.search(x[:1], k=3, labels=["pair"])
    assert sorted(n.row_id for n in r.neighbors) == [5, 2900] and exact == [] and asked == [len(x)]
    asked.clear()
    monkeypatch.setattr(query, "FILTER_ENTRIES_MAX", 100)  # 30 rows of 3000: 2 * 5 * 100 = 1000 > 100 to ask for
    (r,) = idx.search(x[7:8], k=5, labels=["sparse"])
    sparse = np.nonzero(labels == "sparse")[0]
    assert asked == [] and exact == [1]
    assert [n.row_id for n in r.neighbors] == sparse[brute_force(x[sparse], x[7:8], 5, "cosine")[0]].tolist()


def test_dedup_across_sources_and_after_a_catch_up_add(tmp_path):
    """A "test set" with near-copies of "training" rows, added to the training index: --across
    keeps only the pairs between the two; and after a directory grew and the index caught up
    (its new rows sit after the other directory's), pairs involving them are found where they are."""
    import shutil

    from embedx.dedup import find_duplicates

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1200, 32)).astype(np.float32)
    near = lambda i: x[i] + 0.01 * rng.standard_normal(32).astype(np.float32)  # noqa: E731
    x[11] = near(10)  # a duplicate inside the training set
    test = rng.standard_normal((200, 32)).astype(np.float32)
    test[5], test[150] = near(300), near(700)  # test images that are training images
    train = write_features(tmp_path / "train", x[:1000], shard_size=400)
    build_index(train, tmp_path / "i", fx.IndexConfig(factory="Flat", num_queries=50))
    add_to_index(tmp_path / "i", write_features(tmp_path / "test", test, start_id=0))

    def pairs(groups):
        found = {}
        for g, p in zip(groups.group, groups.positions):
            found.setdefault(int(g), set()).add(int(p))
        return sorted(map(sorted, found.values()))

    idx = SearchIndex(tmp_path / "i")
    assert pairs(find_duplicates(idx, 0.99, k=5)) == [[10, 11], [300, 1005], [700, 1150]]
    assert pairs(find_duplicates(idx, 0.99, k=5, across_sources=True)) == [[300, 1005], [700, 1150]]
    with pytest.raises(InputError, match="two or more shard directories"):
        find_duplicates(_one_source_index(tmp_path, train), 0.99, across_sources=True)

    # the training directory grows by 200 rows (one a copy of training row 20, one of test row 7);
    # the index catches up: those rows land at positions 1200.., after the test set's
    x[1100], x[1101] = near(20), test[7] + 0.01 * rng.standard_normal(32).astype(np.float32)
    shutil.rmtree(train)
    write_features(train, x[:1200], shard_size=400)
    assert add_to_index(tmp_path / "i", train)["added"] == 200
    idx = SearchIndex(tmp_path / "i")
    assert idx.rows.row_ids[1300] == 1100 and idx.rows.sources[1300] == 0
    assert pairs(find_duplicates(idx, 0.99, k=5)) == [[10, 11], [20, 1300], [300, 1005], [700, 1150], [1007, 1301]]


def _one_source_index(tmp_path, feats):
    build_index(feats, tmp_path / "one", fx.IndexConfig(factory="Flat", num_queries=20))
    return SearchIndex(tmp_path / "one")


def test_cli_info_describes_an_index_directory(photo_index):
    r = CliRunner().invoke(app, ["info", str(photo_index / "i"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    info = json.loads((photo_index / "i" / "index.json").read_text())
    assert d["vectors"] == info["num_vectors"] == len(embedx.read_features(photo_index / "f"))
    assert d["factory"] == info["factory"] and (d["k"], d["recall_at_k"]) == (info["k"], info["recall_at_k"])
    assert d["model"] == "tf_efficientnet_lite0" and d["sources"] == {str((photo_index / "f").resolve()): d["vectors"]}
    assert d["recall_measured_at_vectors"] == d["vectors"]
    table = CliRunner().invoke(app, ["info", str(photo_index / "i")]).stdout
    assert re.search(r"recall_at_k: [\d.]+", table) and re.search(r"exact_qps: \d+", table)


def _exact_top(xb, xq, k):
    xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    return np.argsort(-(xq @ xb.T), axis=1, kind="stable")[:, :k]


def test_index_add_measures_recall_again_once_grown_and_retunes(tmp_path):
    """An IVF index trained on some clusters, then grown 4x with clusters that lie between them
    (across the quantiser's cells): the nprobe tuned at build no longer reaches the target;
    `index add` measures recall against exact search by index position and raises nprobe, and
    the saved index does what index.json says (checked by brute force)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, 16)).astype(np.float32)
    first = centres[rng.integers(0, 32, 2000)] + 0.15 * rng.standard_normal((2000, 16))
    pairs = rng.integers(0, 32, (20, 2))
    between = (centres[pairs[:, 0]] + centres[pairs[:, 1]]) / 2
    later = between[rng.integers(0, 20, 6000)] + 0.3 * rng.standard_normal((6000, 16))
    x = np.concatenate([first, later]).astype(np.float32)
    a = write_features(tmp_path / "a", x[:2000])
    b = write_features(tmp_path / "b", x[2000:], start_id=2000)
    info = build_index(a, tmp_path / "i", fx.IndexConfig(factory="IVF32,Flat", num_queries=100, target_recall=0.95))
    assert info["measured_at_vectors"] == 2000 and info["search_param"] == "nprobe" and info["target_reached"]
    grown = add_to_index(tmp_path / "i", b)
    again = grown["remeasured"]
    assert again == {"recall_before": info["recall_at_k"], "value_before": info["search_value"]}
    at_old = next(s["recall"] for s in grown["sweep"] if s["value"] == info["search_value"])
    assert at_old < 0.95  # the build's nprobe falls short on the grown index ...
    assert grown["search_value"] > info["search_value"] and grown["target_reached"]  # ... so it was raised
    assert grown["measured_at_vectors"] == 8000 and grown["num_queries"] == 100
    idx = SearchIndex(tmp_path / "i")
    assert idx.info["search_value"] == grown["search_value"]
    rows = np.random.default_rng(1).choice(np.arange(2000, 8000), 200, replace=False)
    want = _exact_top(x, x[rows], 10)
    got = np.array([[n.row_id for n in r.neighbors] for r in idx.search(x[rows], 10)])
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.93, recall  # a fresh sample of the added rows, at the saved nprobe
    on_file = json.loads((tmp_path / "i" / "index.json").read_text())
    assert on_file["recall_at_k"] == grown["recall_at_k"] and on_file["sweep"] == grown["sweep"]


def test_index_add_measures_only_when_asked_or_grown(tmp_path, caplog):
    x, _ = clustered(3000, 16, 20, seed=12)
    a = write_features(tmp_path / "a", x[:2000])
    small = write_features(tmp_path / "s", x[2000:2100], start_id=2000)
    more = write_features(tmp_path / "m", x[2100:2300], start_id=2100)
    forced = write_features(tmp_path / "f", x[2300:2400], start_id=2300)
    build_index(a, tmp_path / "i", fx.IndexConfig(factory="IVF16,Flat", num_queries=50))
    assert add_to_index(tmp_path / "i", small)["remeasured"] is None  # +5 %: not yet
    assert add_to_index(tmp_path / "i", more)["remeasured"] is not None  # +15 % since measured
    assert add_to_index(tmp_path / "i", forced, measure="no")["remeasured"] is None
    with pytest.raises(InputError, match="--measure"):
        add_to_index(tmp_path / "i", forced, measure="sometimes")
    flat = write_features(tmp_path / "fa", x[:500])
    build_index(flat, tmp_path / "fi", fx.IndexConfig(factory="Flat", num_queries=50))
    grown = write_features(tmp_path / "fb", x[500:1500], start_id=500)
    assert add_to_index(tmp_path / "fi", grown)["remeasured"] is None  # exact: recall is 1 at any size
    # a source that is gone: added, not measured, and said so
    import shutil

    later = write_features(tmp_path / "l", x[2400:3000], start_id=2400)
    shutil.rmtree(small)
    out = add_to_index(tmp_path / "i", later, measure="yes")
    assert out["added"] == 600 and out["remeasured"] is None
    assert any("no longer exists" in r.message for r in caplog.records)


def test_cli_index_add_says_what_it_measured(tmp_path):
    x, _ = clustered(3000, 16, 20, seed=13)
    a = write_features(tmp_path / "a", x[:1000])
    b = write_features(tmp_path / "b", x[1000:], start_id=1000)
    build_index(a, tmp_path / "i", fx.IndexConfig(factory="IVF16,Flat", num_queries=50))
    r = CliRunner().invoke(app, ["index", "add", str(tmp_path / "i"), str(b), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "added 2000 vectors; 3000 in" in r.output and "recall@10 measured again on 50 added vectors" in r.output


@pytest.mark.parametrize("factory,on_disk,stored", [
    ("Flat", False, True), ("HNSW16,Flat", False, True), ("IVF8,Flat", False, True), ("IVF8,Flat", True, True),
    ("IVF8,PQ4x4fs,Refine(Flat)", False, True), ("IVF8,SQ8", False, False),
])
def test_queries_by_row_id_take_stored_vectors_from_the_index_when_it_holds_them(tmp_path, factory, on_disk, stored):
    """Indexes that keep the vectors themselves answer id queries without reading a feature
    shard (the shards are deleted to prove it); those that keep only codes read the shards."""
    import shutil

    x, _ = clustered(1200, 16, 10, seed=14)
    feats = write_features(tmp_path / "f", x, shard_size=500)
    build_index(feats, tmp_path / "i", fx.IndexConfig(factory=factory, num_queries=50, on_disk=on_disk))
    idx = SearchIndex(tmp_path / "i")
    positions = [idx.position_of(r) for r in (0, 7, 777, 1199)]
    want = fx.prepare(x[[0, 7, 777, 1199]], "cosine")
    got = fx.stored_vectors(idx.index, positions)
    assert (got is not None) == stored
    np.testing.assert_allclose(idx.vectors_for(positions), want, atol=1e-6)
    before = [[n.row_id for n in r.neighbors] for r in search_ids(idx, [7, 777], k=5)]
    shutil.rmtree(feats)
    if stored:
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert [[n.row_id for n in r.neighbors] for r in search_ids(SearchIndex(tmp_path / "i"), [7, 777], k=5)] == before
    else:
        with pytest.raises(FeaturesError, match="is not a directory"):  # its vectors are in the shards only
            search_ids(SearchIndex(tmp_path / "i"), [7], k=5)


def test_read_rows_reads_only_the_row_groups_that_hold_the_rows(tmp_path, monkeypatch):
    """A query by row id reads the row groups whose row_id statistics cover the ids, not the whole
    shard; shards written as one row group (before row groups were used) give the same rows."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(shards, "SHARD_ROW_GROUP_ROWS", 100)
    x, _ = clustered(3000, 8, 10, seed=21)
    feats = write_features(tmp_path / "f", x, shard_size=2000)  # shards of 2000 and 1000 rows
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in shards.shard_files(feats)] == [20, 10]
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw))

    def rows_of(directory, ids):
        got = {}
        for table in shards.read_rows(directory, ids, columns=["row_id", "embedding"]):
            assert table.column_names == ["row_id", "embedding"]
            got.update(zip(table.column("row_id").to_pylist(), shards.embeddings_of(table)))
        return got

    got = rows_of(feats, [5, 2999, 150, 150, 1999, 2000, 99_999])
    assert sorted(got) == [5, 150, 1999, 2000, 2999]  # an id that no shard holds is absent
    for row_id, vector in got.items():
        np.testing.assert_array_equal(vector, x[row_id])
    assert read == [[0, 1, 19], [0, 9]]  # groups of shard 0 (rows 0-1999), then shard 1 (2000-2999)
    assert rows_of(feats, []) == {}

    one_group = pq.read_table(shards.shard_files(feats)[0])  # the older layout: one row group a shard
    pq.write_table(one_group, shards.shard_files(feats)[0], compression="zstd")
    read.clear()
    got = rows_of(feats, [5, 1999])
    assert read == [[0]] and sorted(got) == [5, 1999]
    np.testing.assert_array_equal(got[1999], x[1999])
