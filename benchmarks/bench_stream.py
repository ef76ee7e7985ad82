"""train-head on features read into memory vs streamed through memory-mapped files.

Writes a labelled shard directory of structured synthetic features (the generator of
bench_heads.py), then runs `embedx train-head` twice in fresh processes, `--stream no` and
`--stream yes`, and reports each run's peak RSS, seconds and validation accuracy. Streaming
should hold only a few chunks of rows in memory whatever the size of the features, and give
the same L-BFGS head.

    python benchmarks/bench_stream.py --n 200000
    python benchmarks/bench_stream.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _results import write_result


HERE = Path(__file__).resolve().parent


def run_child(features: Path, out: Path, stream: str, max_iter: int) -> dict:
    """One train-head in a fresh process. Peak memory two ways: VmHWM, the kernel's peak RSS of
    the process (it also counts pages of memory-mapped files while resident -- clean page cache
    the kernel can drop at any time), and the peak of RssAnon sampled every 20 ms (memory the
    process itself holds). (Not ru_maxrss: Linux carries it over from the parent across exec.)"""
    code = (
        "import json, sys, threading, time\n"
        "from embedx.train import HeadConfig, train_head\n"
        "peak = [0]\n"
        "def sample():\n"
        "    while True:\n"
        "        for line in open('/proc/self/status'):\n"
        "            if line.startswith('RssAnon:'):\n"
        "                peak[0] = max(peak[0], int(line.split()[1]))\n"
        "        time.sleep(0.02)\n"
        "threading.Thread(target=sample, daemon=True).start()\n"
        "t = time.perf_counter()\n"
        f"m = train_head({str(features)!r}, {str(out)!r}, HeadConfig(stream={stream!r}, knn=False, max_iter={max_iter}))\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'val_accuracy': m['val_accuracy'],\n"
        "  'streamed': m['streamed'], 'best': m['best'],\n"
        "  'peak_rss_mib': [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0] / 1024,\n"
        "  'peak_anon_mib': peak[0] / 1024}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedx-bench-stream")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_heads import structured_features
    from bench_search import write_shards

    if args.quick:
        args.n, args.dim, args.max_iter = 3000, 32, 50
    feats = args.work / f"feats-{args.n}x{args.dim}"
    if not (feats / "manifest.json").exists():
        x, y = structured_features(args.n, args.dim)
        write_shards(feats, x, shard_size=10_000, labels=[f"class_{c}" for c in y])
        del x
    runs = {}
    for stream in ("no", "yes"):
        runs[stream] = run_child(feats, args.work / f"head-{stream}", stream, args.max_iter)
    feature_mib = args.n * args.dim * 4 / 2**20
    result = {"benchmark": "stream", "n": args.n, "dim": args.dim, "feature_mib": feature_mib,
              "in_memory": runs["no"], "streamed": runs["yes"],
              "anon_streamed_over_in_memory": runs["yes"]["peak_anon_mib"] / runs["no"]["peak_anon_mib"],
              "same_head": runs["yes"]["best"] == runs["no"]["best"]
              and abs(runs["yes"]["val_accuracy"] - runs["no"]["val_accuracy"]) < 1e-9}
    print(f"train-head on {args.n} x {args.dim} float32 features ({feature_mib:.0f} MiB), L-BFGS sweep of the default 10 L2 strengths")
    for name, r in (("in memory", runs["no"]), ("streamed", runs["yes"])):
        print(f"  {name:10s}: peak anonymous memory {r['peak_anon_mib']:7.0f} MiB (VmHWM {r['peak_rss_mib']:.0f})"
              f"  {r['seconds']:6.1f} s  val acc {r['val_accuracy']:.4f}")
    print(f"  same head: {result['same_head']}")
    write_result(result, "stream", args.quick, args.out)


if __name__ == "__main__":
    main()
