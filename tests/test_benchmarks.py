"""Each benchmark runs end to end at a tiny size (--quick) and writes its result file.
(The figures themselves come from full runs; see benchmarks/README.md.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedx.demo_data import fashion_mnist_available

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script, tmp_path, *extra):
    out = tmp_path / f"{script}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(BENCH.parent))
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_extract_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--cache", str(tmp_path / "cache"))
    ips = r["images_per_second"]
    # on glibc (here) the engine keeps freed memory on CPU: the ceiling and timm-style loop are
    # then measured on both sides of that switch
    assert r["heap"] == "keep"
    assert set(ips) == {"ceiling_release", "naive", "timm_style", "timm_style_keep", "ceiling",
                        "embedx_first_run", "embedx"}
    assert all(v > 0 for v in ips.values())
    rounds = r["rounds"]  # one round with --quick, between two ceiling runs; the figures are its medians
    first, last = rounds["ceiling_runs"]
    assert rounds["ceiling"] == [pytest.approx(2 / (1 / first + 1 / last))] == [pytest.approx(ips["ceiling"])]
    assert rounds["embedx"] == [ips["embedx"]]
    assert r["pipeline_efficiency"] == pytest.approx(ips["embedx"] / ips["ceiling"])
    assert r["pipeline_efficiency_of_medians"] == pytest.approx(r["pipeline_efficiency"])
    assert rounds["pipeline_efficiency"] == [pytest.approx(r["pipeline_efficiency"])]
    # without the start-up, embedx's rate can only be higher
    assert rounds["embedx_after_startup"][0] > ips["embedx"]
    assert r["pipeline_efficiency_after_startup"] == pytest.approx(rounds["embedx_after_startup"][0] / ips["ceiling"])
    assert rounds["stage_seconds"][0]["startup"] > 0
    assert r["heap_keep_gain_ceiling"] == pytest.approx(ips["ceiling"] / ips["ceiling_release"])


def test_bench_extract_batch_sizes_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--batch-sizes", "8,4", "--cache", str(tmp_path / "cache"))
    ips = r["images_per_second"]
    assert set(ips) == {"8", "4"} and all(len(v) == 1 and v[0] > 0 for v in ips.values())


def test_bench_extract_model_threads_quick(tmp_path):
    """--model-threads sets each run's OMP_NUM_THREADS, which the model's torch then uses."""
    r = run("bench_extract.py", tmp_path, "--batch-sizes", "4", "--model-threads", "auto,1",
            "--cache", str(tmp_path / "cache"))
    assert set(r["model_threads"]) == {"4/model_threads=auto", "4/model_threads=1"}
    assert r["model_threads"]["4/model_threads=1"] == [1] and r["model_threads"]["4/model_threads=auto"][0] >= 1
    assert all(v[0] > 0 for v in r["images_per_second"].values())


def test_bench_extract_heaps_and_jpeg_decoders_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--batch-sizes", "4", "--heaps", "release,keep",
            "--jpeg-decoders", "pil,simplejpeg", "--cache", str(tmp_path / "cache"))
    ips = r["images_per_second"]
    assert set(ips) == {"4/release/pil", "4/release/simplejpeg", "4/keep/pil", "4/keep/simplejpeg"}
    assert all(len(v) == 1 and v[0] > 0 for v in ips.values())
    assert r["env"]["jpeg_decoder"].startswith("simplejpeg ")


def test_bench_extract_compile_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--compile", "--precisions", "fp32", "--cache", str(tmp_path / "cache"))
    fp32 = r["precisions"]["fp32"]
    assert fp32["engine_compiles_with"] == "freezing"
    assert not fp32["eager"][0]["still_compiled"] and fp32["eager"][0]["images_per_second"] > 0
    for name in ("compiled", "compiled_freezing"):  # without and with inductor's freezing
        run_ = fp32[name][0]
        assert run_["still_compiled"] and run_["images_per_second"] > 0 and run_["min_cosine_vs_eager"] > 0.999
        assert run_["min_cosine_vs_fp32"] > 0.999  # the photos through the compiled model
        assert fp32[f"{name}_over_eager"] > 0


def test_bench_extract_model_only_takes_weights(tmp_path):
    """--weights reaches the model-only runs' processes: a checkpoint file of a network unlike
    the seeded random one gives other embeddings (so other cosines to fp32 than random's)."""
    import timm
    import torch

    torch.manual_seed(1)
    ckpt = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), ckpt)
    got = {}
    for weights in ("random", str(ckpt)):
        r = run("bench_extract.py", tmp_path, "--fold", "--precisions", "bf16", "--weights", weights,
                "--cache", str(tmp_path / "cache"))
        assert r["weights"] == weights
        got[weights] = r["precisions"]["bf16"]["folded"][0]["mean_cosine_vs_fp32"]
    assert got["random"] != got[str(ckpt)]


def test_bench_extract_compile_runs_quick(tmp_path):
    """`embedx extract` through the CLI with --compile no and yes at two folder sizes, and the line
    fixed seconds + images / rate fitted per choice."""
    r = run("bench_extract.py", tmp_path, "--compile-runs", "x", "--cache", str(tmp_path / "cache"))
    assert r["benchmark"] == "extract-compile-runs" and r["precision"] in ("fp32", "bf16")
    for choice in ("no", "yes"):
        runs = r["compile"][choice]["runs"]
        assert {n: [x["embedded"] for x in rs] for n, rs in runs.items()} == {"32": [32], "64": [64]}
        assert all(x["compile"] == choice and not x["compile_failed"] and x["seconds"] > 0 for rs in runs.values() for x in rs)
        assert set(r["compile"][choice]) == {"runs", "fixed_seconds", "images_per_second"}


def test_fit_fixed_and_rate():
    sys.path.insert(0, str(BENCH))
    try:
        from bench_extract import fit_fixed_and_rate
    finally:
        sys.path.remove(str(BENCH))
    fixed, rate = fit_fixed_and_rate([(1000, 20.0 + 1000 / 150), (4000, 20.0 + 4000 / 150), (4000, 20.0 + 4000 / 150)])
    assert fixed == pytest.approx(20.0) and rate == pytest.approx(150.0)


def test_bench_extract_fold_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--fold", "--precisions", "fp32", "--cache", str(tmp_path / "cache"))
    fp32 = r["precisions"]["fp32"]
    assert fp32["unfolded"][0]["images_per_second"] > 0 and fp32["folded"][0]["images_per_second"] > 0
    assert fp32["unfolded"][0]["min_cosine_vs_fp32"] > 0.9999 and fp32["folded"][0]["min_cosine_vs_fp32"] > 0.999


def test_bench_extract_fuse_act_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--fuse-act", "--precisions", "fp32", "--cache", str(tmp_path / "cache"))
    fp32 = r["precisions"]["fp32"]
    assert r["benchmark"] == "extract-fuse_act" and fp32["fused_over_unfused"] > 0
    assert fp32["unfused"][0]["min_cosine_vs_fp32"] > 0.999 and fp32["fused"][0]["min_cosine_vs_fp32"] > 0.999


def test_bench_extract_fuse_acts_end_to_end_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--batch-sizes", "4", "--fuse-acts", "no,yes", "--cache", str(tmp_path / "cache"))
    ips = r["images_per_second"]
    assert set(ips) == {"4/fuse_act=no", "4/fuse_act=yes"} and all(v[0] > 0 for v in ips.values())


def test_bench_extract_fp32_stem_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--fp32-stem", "--cache", str(tmp_path / "cache"))
    bf16 = r["precisions"]["bf16"]  # bf16 only, by default: in fp32 the switch changes nothing
    assert set(r["precisions"]) == {"bf16"} and r["benchmark"] == "extract-fp32_stem"
    assert bf16["bf16_stem"][0]["images_per_second"] > 0 and bf16["fp32_stem"][0]["images_per_second"] > 0
    assert bf16["bf16_stem"][0]["min_cosine_vs_fp32"] > 0.9 and bf16["fp32_stem"][0]["min_cosine_vs_fp32"] > 0.9


def test_bench_extract_bf16_weights_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--bf16-weights", "--cache", str(tmp_path / "cache"))
    bf16 = r["precisions"]["bf16"]
    assert set(r["precisions"]) == {"bf16"} and r["benchmark"] == "extract-bf16_weights"
    assert bf16["fp32_weights"][0]["images_per_second"] > 0 and bf16["bf16_weights"][0]["images_per_second"] > 0
    # (the same output either way is test_mixed's: these are two processes with random weights)
    assert bf16["fp32_weights"][0]["min_cosine_vs_fp32"] > 0.9 and bf16["bf16_weights"][0]["min_cosine_vs_fp32"] > 0.9


def test_bench_extract_memory_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--memory", "--cache", str(tmp_path / "cache"))
    assert [x["images"] for x in r["runs"]] == [200, 1000] and all(x["peak_rss_mib"] > 0 for x in r["runs"])


def test_bench_gpu_script_runs_on_the_cpu(tmp_path):
    """The GPU benchmark is run on lent machines with minutes to spare: check here that it runs
    through (on the CPU, tiny model) and reports every figure, before it is carried there."""
    r = run("bench_gpu.py", tmp_path)
    (row,) = r["runs"]
    assert r["env"]["jpeg_decoder"].startswith("simplejpeg ")
    keys = ("ceiling", "e2e_pil", "e2e_device", "e2e_pil_prefetch0", "e2e_device_prefetch0",
            "e2e_device_share0.4", "e2e_device_share0.7")
    assert all(row[k] > 0 for k in keys), row
    decoders = ["torchcodec", "torchvision", "nvimgcodec"]
    assert r["env"]["device_decoders"] == decoders and row["e2e_device_torchvision"] > 0
    assert row["e2e_device_nvimgcodec"] > 0 and row["stages_device_nvimgcodec"]["device_decode"] > 0
    assert {d: set(v) for d, v in row["device_decode_stage"].items()} == {
        d: {"decode_only", "decode_resize"} for d in decoders}
    assert row["stages_device"]["device_decode"] > 0 and "device_decode" not in row["stages_pil"]
    # what the fp32 stem (the default) costs: all-bf16 beside it
    assert row["fp32_modules"] == ["conv_stem", "bn1", "blocks.0"]
    assert row["ceiling_no_fp32_stem"] > 0 and row["e2e_device_no_fp32_stem"] > 0
    assert row["seconds_device"]["wall"] >= row["seconds_device"]["run"] > 0


def test_bench_heads_quick(tmp_path):
    r = run("bench_heads.py", tmp_path)
    assert r["embedx_lbfgs_sweep"]["heads"] >= 8 and r["embedx_adamw_sweep"]["heads"] >= 8
    assert r["sklearn_logreg"]["seconds"] > 0 and r["embedx_lbfgs_one_head"]["seconds"] > 0
    # the same objective, minimised by both: embedx must reach scikit-learn's optimum
    assert r["objective_difference_embedx_minus_sklearn"] < 1e-4


def test_bench_extract_decode_quick(tmp_path):
    r = run("bench_extract.py", tmp_path, "--decode-only", "--cache", str(tmp_path / "cache"))
    rows = r["one_decoder"]
    assert set(rows) == {"photos_500x375", "large_2000x1500"}
    assert all(row["embedx_pil_ms"] > 0 and row["simplejpeg_gain"] > 0 for row in rows.values())
    assert all(x["exact_ms"] > 0 and x["embedx_ms"] > 0 for x in rows.values())


def test_bench_stream_quick(tmp_path):
    r = run("bench_stream.py", tmp_path, "--work", str(tmp_path / "work"))
    assert r["streamed"]["streamed"] and not r["in_memory"]["streamed"]
    assert r["same_head"] and r["streamed"]["peak_anon_mib"] > 0


def test_bench_search_quick(tmp_path):
    r = run("bench_search.py", tmp_path)
    assert r["runs"][0]["recall_at_10"] >= 0.95 and r["runs"][0]["qps"] > 0


@pytest.mark.ray
def test_bench_scale_quick(tmp_path):
    pytest.importorskip("ray")
    r = run("bench_scale.py", tmp_path)
    assert r["outputs_identical"] and r["runs"]["ray"]["images"] == r["runs"]["local"]["images"]


@pytest.mark.skipif(not fashion_mnist_available(), reason="apt-get install dataset-fashion-mnist")
def test_bench_fashion_quick(tmp_path):
    r = run("bench_fashion.py", tmp_path, "--work", str(tmp_path / "work"))
    assert 0 <= r["results"]["linear"]["val_accuracy"] <= 1 and "gain" in r["results"]["finetune"]


def test_bench_archive_quick(tmp_path):
    r = run("bench_archive.py", tmp_path, "--cache", str(tmp_path / "cache"))
    assert r["images"] >= 16 and r["archive_bytes"] > 0
    assert set(r["rounds"]) == {"list_folder_us", "list_archive_us", "decode_folder_ms", "decode_archive_ms"}
    assert r["decode_archive_over_folder"] > 0 and r["listing_archive_over_folder"] > 0


def test_bench_serve_quick(tmp_path):
    r = run("bench_serve.py", tmp_path, "--cache", str(tmp_path / "cache"))
    assert r["images"] >= 16 and len(r["runs"]["serve_image_ms"]) == 5 and len(r["runs"]["cli_image_s"]) == 1
    assert r["cli_over_serve_image"] > 0 and r["serve_startup_s"] > 0
    assert len(r["runs"]["serve_image_no_isolate_ms"]) == 5 and r["isolated_over_in_process_image"] > 0
    assert len(r["concurrent"]["batched_no_isolate"]) == 1 and r["concurrent"]["isolated_over_in_process_qps"] > 0
