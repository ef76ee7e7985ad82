"""Scale-out engines: Ray Data, and several devices of one machine. Both must write exactly
what the local engine writes, and resume the same way."""

import sys

import numpy as np
import pytest

import embedx
from embedx import shards
from embedx.errors import DependencyError
from embedx.extractor import ExtractConfig, extract

CFG = dict(progress=False, num_workers=0, batch_size=4, shard_size=5, precision="fp32")


@pytest.fixture(scope="module")
def local_ref(tiny_dir, tmp_path_factory, backbone):
    out = tmp_path_factory.mktemp("local") / "f"
    extract(tiny_dir, out, ExtractConfig(**CFG), backbone=backbone)
    return embedx.read_features(out)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def _same(a, b):
    assert a.paths == b.paths and a.row_ids.tolist() == b.row_ids.tolist() and a.labels == b.labels
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)
    assert {k: v for k, v in a.metadata.items()} == {k: v for k, v in b.metadata.items()}


@pytest.mark.ray
def test_ray_engine_writes_what_the_local_engine_writes(ray_cluster, tiny_dir, tmp_path, backbone, local_ref):
    r = extract(tiny_dir, tmp_path / "f", ExtractConfig(**CFG), backbone=backbone, engine="ray")
    assert r.num_embedded == 24
    _same(embedx.read_features(tmp_path / "f"), local_ref)
    assert [s["rows"] for s in shards.read_manifest(tmp_path / "f")["shards"]] == [5, 5, 5, 5, 4]


@pytest.mark.ray
def test_ray_run_that_fails_midway_resumes(ray_cluster, tiny_dir, tmp_path, backbone, local_ref, monkeypatch):
    real = shards.write_errors
    calls = {"n": 0}

    def crash_on_second_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "write_errors", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(tiny_dir, tmp_path / "f", ExtractConfig(**CFG), backbone=backbone, engine="ray")
    partial = shards.read_manifest(tmp_path / "f")
    assert [s["index"] for s in partial["shards"]] == [0] and not partial["complete"]
    monkeypatch.setattr(shards, "write_errors", real)
    r = extract(tiny_dir, tmp_path / "f", ExtractConfig(**CFG), backbone=backbone, engine="ray")
    assert r.num_skipped == 5 and r.num_embedded == 24
    _same(embedx.read_features(tmp_path / "f"), local_ref)


def test_several_devices_write_what_one_writes(tiny_dir, tmp_path, local_ref):
    r = extract(tiny_dir, tmp_path / "f", ExtractConfig(**CFG), devices=["cpu", "cpu"])
    assert r.num_embedded == 24 and r.num_errors == 0
    _same(embedx.read_features(tmp_path / "f"), local_ref)
    assert [s["index"] for s in shards.read_manifest(tmp_path / "f")["shards"]] == [0, 1, 2, 3, 4]


@pytest.mark.ray
def test_ray_engine_reads_archives_and_applies_pool_and_preprocessing(ray_cluster, tiny_dir, tmp_path, backbone):
    """Ray's workers are not forked from the driver: they index the archive themselves; its actors
    pool as the run asks, on pixels the driver's preprocessing made."""
    import tarfile

    tar = tmp_path / "tiny.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tiny_dir, arcname=".")
    cfg = ExtractConfig(**{**CFG, "pool": "max", "img_size": 160, "crop_pct": 1.0})
    extract(tar, tmp_path / "local", cfg, backbone=backbone)
    r = extract(tar, tmp_path / "ray", cfg, backbone=backbone, engine="ray")
    assert r.num_embedded == 24
    got = embedx.read_features(tmp_path / "ray")
    assert got.paths[0].startswith("tiny.tar/class_0/") and got.metadata["pooling"] == "max"
    ref = embedx.read_features(tmp_path / "local")
    assert got.paths == ref.paths and got.labels == ref.labels and got.metadata == ref.metadata
    # the actor runs the model on one thread here, the local engine on two: max pooling keeps the
    # last bits of the different summation orders that averaging smooths (our reading; 2.5e-5 here)
    np.testing.assert_allclose(got.embeddings, ref.embeddings, rtol=1e-4, atol=1e-4)


def test_round_robin_assignment_is_deterministic():
    from embedx.multi_device import assign

    assert assign([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert assign([3, 4], 3) == [[3], [4], []]


def test_ray_missing_says_how_to_install(monkeypatch):
    from embedx.ray_engine import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DependencyError, match=r"pip install 'embedx\[ray\]'"):
        import_ray()


def test_several_devices_with_random_weights_build_one_network(tiny_dir, tmp_path):
    """Each process builds its own backbone: with weights='random' they must use the driver's
    network, not a random network of their own; and the run's preprocessing overrides."""
    from embedx.backbone import load_backbone

    cfg = ExtractConfig(**{**CFG, "model": "test_efficientnet", "weights": "random", "img_size": 96, "crop_pct": 1.0,
                                 "pool": "avgmax"})
    driver = load_backbone("test_efficientnet", "random")
    extract(tiny_dir, tmp_path / "one", cfg, backbone=driver)
    extract(tiny_dir, tmp_path / "two", cfg, backbone=driver, devices=["cpu", "cpu"])
    two = embedx.read_features(tmp_path / "two")
    assert two.metadata["data_config"]["input_size"] == [3, 96, 96] and two.metadata["pooling"] == "avgmax"
    _same(two, embedx.read_features(tmp_path / "one"))


def _grown(tiny_dir, tmp_path, backbone):
    """A folder with 12 of tiny_dir's images, embedded locally into base/, then grown to all 24;
    returns (folder, base, the local engine's --update result)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    later = sorted(src.rglob("*.*"))[1::2]
    held = tmp_path / "held"
    for p in later:
        (held / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        p.rename(held / p.relative_to(src))
    extract(src, tmp_path / "base", ExtractConfig(**CFG), backbone=backbone)
    shutil.copytree(held, src, dirs_exist_ok=True)
    shutil.copytree(tmp_path / "base", tmp_path / "local")
    r = extract(src, tmp_path / "local", ExtractConfig(**CFG, update=True), backbone=backbone)
    assert r.num_added == 12 and r.num_embedded == 24
    return src, tmp_path / "base", embedx.read_features(tmp_path / "local")


@pytest.mark.ray
def test_ray_engine_update_writes_what_the_local_engine_writes(ray_cluster, tiny_dir, tmp_path, backbone):
    import shutil

    src, base, ref = _grown(tiny_dir, tmp_path, backbone)
    shutil.copytree(base, tmp_path / "ray")
    r = extract(src, tmp_path / "ray", ExtractConfig(**CFG, update=True), backbone=backbone, engine="ray")
    assert (r.num_added, r.num_embedded, r.num_skipped) == (12, 24, 12)
    _same(embedx.read_features(tmp_path / "ray"), ref)
    assert ref.row_ids.tolist() == list(range(12)) + list(range(15, 27))  # after shard 2's boundary


def test_several_devices_update_writes_what_one_writes(tiny_dir, tmp_path, backbone):
    import shutil

    src, base, ref = _grown(tiny_dir, tmp_path, backbone)
    shutil.copytree(base, tmp_path / "dev")
    r = extract(src, tmp_path / "dev", ExtractConfig(**CFG, update=True), devices=["cpu", "cpu"])
    assert (r.num_added, r.num_embedded, r.num_skipped) == (12, 24, 12)
    _same(embedx.read_features(tmp_path / "dev"), ref)
