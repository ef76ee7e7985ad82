import json

import numpy as np
import pytest
import torch

import embedx
from embedx import finetune as ft
from embedx.extractor import ExtractConfig, extract
from embedx.predict import predict

from .conftest import segfault_on

TINY = dict(model="test_efficientnet", weights="random", head_epochs=1, epochs=2, batch_size=8, num_workers=0,
            progress=False, unfreeze_blocks=2, patience=5, lr=3e-3)


def test_top_blocks_follow_timm_grouping():
    import timm

    m = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    assert ft.top_block_parameters(m, 0) == []
    names = ft.top_block_parameters(m, 2)
    assert any(n.startswith("blocks.6.0.") for n in names) and any(n.startswith("blocks.5.3.") for n in names)
    assert not any(n.startswith("blocks.5.2.") for n in names)
    assert "conv_head.weight" in names and "bn2.weight" in names  # the layers after the last block
    assert not any(n.startswith(("conv_stem", "bn1.")) for n in names)


def test_finetune_trains_only_top_blocks_and_keeps_bn_stats(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from embedx.backbone import load_backbone

    torch.manual_seed(0)
    m = ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY))
    for key in ("val_accuracy", "val_top5_accuracy", "train_accuracy", "num_classes", "classes", "num_train",
                "num_val", "head_only_val_accuracy", "finetune_gain", "history"):
        assert key in m, key
    assert m["num_classes"] == 3 and len(m["history"]) == 3
    assert [h["stage"] for h in m["history"]] == [1, 2, 2]
    tuned = load_file(str(tmp_path / "ft" / "backbone.safetensors"))
    # the randomly initialised start, rebuilt with the same seed timm used
    torch.manual_seed(0)
    start = load_backbone("test_efficientnet", "random").model.state_dict()
    top = set(ft.top_block_parameters(load_backbone("test_efficientnet", "random").model, 2))
    best_epoch_stage = max(m["history"], key=lambda h: h["val_accuracy"])["stage"]
    for name, value in tuned.items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(value, start[name], msg=f"BN statistics changed: {name}")
        elif name not in top:
            torch.testing.assert_close(value, start[name], msg=f"frozen parameter changed: {name}")
    if best_epoch_stage == 2:
        assert any(not torch.equal(tuned[n], start[n]) for n in top)
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["kind"] == "finetune" and cfg["classes"] == ["class_0", "class_1", "class_2"]


def test_interrupted_finetune_resumes(tiny_dir, tmp_path, monkeypatch):
    real_evaluate = ft._evaluate
    calls = {"n": 0}

    def interrupt_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ft, "_evaluate", interrupt_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY))
    ckpt = torch.load(tmp_path / "ft" / ft.CHECKPOINT, weights_only=True)
    assert json.loads(ckpt["state"])["epoch"] == 1 and not (tmp_path / "ft" / "metrics.json").exists()
    monkeypatch.setattr(ft, "_evaluate", real_evaluate)
    m = ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY))
    assert [h["stage"] for h in m["history"]] == [1, 2, 2]  # the first epoch was not redone
    # a finished run is not trained again
    assert ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY))["history"] == m["history"]
    with pytest.raises(embedx.EmbedxError, match="other settings"):
        ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**{**TINY, "lr": 1e-2}))
    from embedx.errors import LockedError
    from embedx.shards import DirectoryLock

    with DirectoryLock(tmp_path / "ft"), pytest.raises(LockedError):  # a run already writing there
        ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY))


@pytest.mark.parametrize("overrides", [{}, {"img_size": 96, "crop_pct": 1.0}])
def test_finetuned_backbone_reextracts_and_predicts(tiny_dir, tmp_path, overrides):
    """predict embeds images as the fine-tuning did: with its preprocessing overrides, if any."""
    ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY, **overrides))
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())["provenance"]["data_config"]
    w = str(tmp_path / "ft" / "backbone.safetensors")
    extract(tiny_dir, tmp_path / "f", ExtractConfig(model="test_efficientnet", weights=w, progress=False, num_workers=0,
                                                    precision="fp32", **overrides))
    f = embedx.read_features(tmp_path / "f")
    assert f.metadata["weights_source"] == f"file:{w}" and len(f) == 24
    assert f.metadata["data_config"] == saved
    if overrides:
        assert saved["input_size"] == [3, 96, 96] and saved["crop_pct"] == 1.0
    by_images = predict(tmp_path / "ft", [str(tiny_dir)])
    by_shards = predict(tmp_path / "ft", [str(tmp_path / "f")])
    assert len(by_images.paths) == 24 and by_images.classes == ["class_0", "class_1", "class_2"]
    np.testing.assert_allclose(by_images.proba, by_shards.proba, atol=1e-4)


def test_unknown_heap_choice_is_refused_before_any_work(tiny_dir, tmp_path):
    from embedx.errors import InputError

    with pytest.raises(InputError, match="--heap must be one of auto, keep, release"):
        ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**TINY, heap="tcmalloc"))
    assert not list((tmp_path / "ft").glob("*"))  # nothing written


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 0), (3, 2), (8, 4)])
def test_default_loader_workers_follow_the_cores(monkeypatch, cpus, workers):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert ft.default_num_workers() == workers


def _copy_with_bad_files(tiny_dir, dest):
    import shutil

    shutil.copytree(tiny_dir, dest)
    (dest / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    good = (dest / "class_1" / "img_001.jpg").read_bytes()
    (dest / "class_1" / "truncated.jpg").write_bytes(good[:40])
    return dest


def test_unreadable_images_are_recorded_and_skipped(tiny_dir, tmp_path):
    """Images that cannot be read were dropped without a word; they are now skipped and said
    (metrics.json 'skipped', kept in skipped.json for reruns), and the run completes."""
    data = _copy_with_bad_files(tiny_dir, tmp_path / "data")
    m = ft.finetune(data, tmp_path / "ft", ft.FinetuneConfig(**TINY))
    assert m["num_skipped"] == 2 and set(m["skipped"]) == {"class_0/broken.jpg", "class_1/truncated.jpg"}, m["skipped"]
    # the decoder's own reasons, as extract records them (kind: message)
    assert all(why.startswith("truncated: ") for why in m["skipped"].values()), m["skipped"]
    assert json.loads((tmp_path / "ft" / ft.SKIPPED).read_text()) == m["skipped"]
    assert m["num_train"] + m["num_val"] == 26  # unreadable ones stay listed: the splits and shuffles do not move


def test_an_image_that_kills_a_loader_process_is_left_out_and_the_fine_tune_goes_on(tiny_dir, tmp_path,
                                                                                    monkeypatch):
    """A decoding library that segfaults on an image killed the DataLoader worker, and the fine-tune
    with it, at every rerun. Now every image is decoded alone in a process of its own, the one that
    kills it is left out (metrics.json 'skipped', with the signal), and the run resumes."""
    import os
    import signal

    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))
    killer = files[7]
    real = ft.decode_image

    def decode(file, *args, **kwargs):
        if file == killer:
            os.kill(os.getpid(), signal.SIGSEGV)  # in the loader process (forked: it has this patch)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(ft, "decode_image", decode)
    m = ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**{**TINY, "num_workers": 2}))
    rel = os.path.relpath(killer, str(tiny_dir.resolve()))
    assert list(m["skipped"]) == [rel] and "decoder_crashed" in m["skipped"][rel] and "SIGSEGV" in m["skipped"][rel]
    assert m["num_train"] + m["num_val"] == 23 and [h["stage"] for h in m["history"]] == [1, 2, 2]


def test_a_loader_death_that_no_image_explains_is_an_error_with_advice(tiny_dir, tmp_path, monkeypatch):
    import os
    import signal

    from embedx.errors import EmbedxError

    real = ft.decode_image
    marker = tmp_path / "killed-once"

    def decode(file, *args, **kwargs):
        if not marker.exists():  # one death, in the first loader process that decodes: an OOM kill, say
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(ft, "decode_image", decode)
    with pytest.raises(EmbedxError, match="no image kills one when decoded on its own.*fewer --num-workers"):
        ft.finetune(tiny_dir, tmp_path / "ft", ft.FinetuneConfig(**{**TINY, "num_workers": 2}))
    assert marker.exists() and not (tmp_path / "ft" / ft.SKIPPED).exists()  # it died once; nothing was left out


def test_an_in_process_decoder_crash_is_found_by_the_rerun(tiny_dir, tmp_path):
    """Without loader processes (2 cores) a segfault while decoding ends the fine-tune itself. The
    rerun sees the last run did not exit cleanly, decodes every image in a separate process first,
    leaves the culprit out and completes (before: it died again, at every rerun)."""
    import os
    import signal
    import subprocess
    import sys

    files = sorted(str(p) for p in tiny_dir.rglob("*.jpg"))
    code = segfault_on("embedx.finetune", files[3]) + f"""
import json
from embedx import finetune as ft
m = ft.finetune({str(tiny_dir)!r}, {str(tmp_path / "ft")!r}, ft.FinetuneConfig(**{TINY!r}))
print(json.dumps(m["skipped"]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGSEGV, first.stderr[-2000:]
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ended without cleaning up" in again.stderr
    skipped = json.loads(again.stdout.strip().splitlines()[-1])
    rel = os.path.relpath(files[3], str(tiny_dir.resolve()))
    assert list(skipped) == [rel] and "SIGSEGV" in skipped[rel], skipped


def test_each_epoch_decodes_every_image_once(tiny_dir, tmp_path, monkeypatch):
    """The progress bar (tqdm.auto) called iter() on the DataLoader in its constructor and again
    when iterated: every epoch started two sets of loader processes, and the first decoded batches
    that nobody read. Counted across the loader processes (one line per decode in a shared file)."""
    import os

    log_file = tmp_path / "decodes.log"
    real = ft.decode_image

    def decode(file, *args, **kwargs):
        with open(log_file, "a") as f:  # O_APPEND: one whole line per write, from any process
            f.write(f"{os.getpid()} {file}\n")
        return real(file, *args, **kwargs)

    monkeypatch.setattr(ft, "decode_image", decode)
    cfg = ft.FinetuneConfig(**{**TINY, "num_workers": 2, "head_epochs": 1, "epochs": 0, "progress": True})
    m = ft.finetune(tiny_dir, tmp_path / "ft", cfg)
    lines = log_file.read_text().splitlines()
    # one epoch over train, evaluations over val (each epoch, then again at the end) and train (at the end)
    assert len(lines) == 2 * m["num_train"] + 2 * m["num_val"], (len(lines), m["num_train"], m["num_val"])
