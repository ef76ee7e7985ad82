"""Query latency: `embedx serve` (index and backbone loaded once) vs `embedx search` (a fresh
process per query, as a script calling the CLI runs it), side by side in one run.

On an index (Flat) over real-photo JPEGs (~500x375, scikit-image's photos varied with a fixed
seed, as bench_extract.py) embedded with the default model, reports:

1. cli_image_s    - `embedx search IDX query.jpg -k 10 --format json`, wall time per call;
2. serve_image_ms - POST /search/image?k=10 with the same JPEG to a running `embedx serve`,
                    median over --queries sequential requests (different photos);
3. serve_id_ms    - POST /search {"ids": [...], "k": 10} likewise (no model), a new connection
                    each (urllib), and serve_id_kept_ms: the same over one kept connection;

and cli_image_s / serve_image_ms: how many times faster an image query gets once the server is up;
then serve_image_no_isolate_ms: the image queries again, to a server that decodes them in its
own process (--no-isolate-decode) instead of a decoder process (the default).
The server's own start-up (imports, loading the index and the backbone) is reported apart.

Then, under concurrent load (--clients threads, each sending one-image requests, --concurrent
in all), image queries/s and latency of the server with dynamic batching (--max-batch 64, the
default) vs one request at a time (--max-batch 1), a fresh server each, alternating --rounds
times: the gain of embedding the requests that queue up together.

    python benchmarks/bench_serve.py --images 256
    python benchmarks/bench_serve.py --quick        # a smoke run (the test suite uses it)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _results import write_result

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _post(url: str, data: bytes) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=120) as r:
        return json.loads(r.read())


def _start_server(embedx_cmd, idx, env, *extra):
    """A running `embedx serve` on a free port, warmed up (its first forward pass): (process, url)."""
    proc = subprocess.Popen([*embedx_cmd, "serve", str(idx), "--port", "0", *extra], env=env,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"on (http://[\d.]+:\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    url = m.group(1)
    return proc, url


def _concurrent(url: str, blobs: list[bytes], paths: list[str], clients: int, requests: int) -> dict:
    """`requests` one-image queries from `clients` threads at once: queries/s, latency, and the
    server's images per backbone call (from GET /)."""
    from concurrent.futures import ThreadPoolExecutor

    _post(url + "/search/image?k=10", blobs[0])  # warm-up (first forward pass)
    before = _get(url + "/")["image_batches"]

    def one(i):
        t = time.perf_counter()
        got = _post(url + "/search/image?k=10", blobs[i % len(blobs)])
        assert got["results"][0]["results"][0]["path"] == paths[i % len(blobs)], got
        return (time.perf_counter() - t) * 1e3

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ms = sorted(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t
    after = _get(url + "/")["image_batches"]
    calls, images = after["calls"] - before["calls"], after["images"] - before["images"]
    return {"qps": requests / seconds, "p50_ms": ms[len(ms) // 2], "p95_ms": ms[int(len(ms) * 0.95)],
            "images_per_call": images / max(1, calls)}


def _image_query_ms(url: str, files: list[Path], paths: list[str], i: int) -> float:
    """POST /search/image with photo i (of `files`, cycled): milliseconds, the answer checked (the
    photo itself first)."""
    blob = files[i % len(files)].read_bytes()
    t = time.perf_counter()
    got = _post(url + "/search/image?k=10", blob)
    ms = (time.perf_counter() - t) * 1e3
    assert got["results"][0]["results"][0]["path"] == paths[i % len(files)], got
    return ms


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="JPEGs in the index")
    ap.add_argument("--queries", type=int, default=50, help="sequential requests to the server, per kind")
    ap.add_argument("--cli-calls", type=int, default=3, help="`embedx search` processes")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients for the batching comparison")
    ap.add_argument("--concurrent", type=int, default=256, help="image requests in all, per server, under concurrency")
    ap.add_argument("--rounds", type=int, default=2, help="servers per --max-batch setting, alternating")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "embedx-bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.images, args.queries, args.cli_calls, args.clients, args.concurrent, args.rounds = 16, 5, 1, 2, 8, 1

    import embedx
    from bench_extract import photo_folder
    from embedx.extractor import ExtractConfig, extract
    from embedx.index import IndexConfig
    from embedx.indexer import build_index

    folder = photo_folder(args.images, args.cache)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    extract(folder, work / "f", ExtractConfig(progress=False))
    build_index(work / "f", work / "idx", IndexConfig(factory="Flat", num_queries=min(100, args.images // 2)))
    feats = embedx.read_features(work / "f")
    files = [folder / p for p in feats.paths]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    embedx_cmd = [sys.executable, "-m", "embedx"]

    cli = []
    for i in range(args.cli_calls):
        t = time.perf_counter()
        subprocess.run([*embedx_cmd, "search", str(work / "idx"), str(files[i % len(files)]), "-k", "10",
                        "--format", "json"], check=True, env=env, stdout=subprocess.DEVNULL)
        cli.append(time.perf_counter() - t)

    t = time.perf_counter()
    proc, url = _start_server(embedx_cmd, work / "idx", env)
    startup = time.perf_counter() - t
    try:
        _post(url + "/search/image?k=10", files[0].read_bytes())  # warm-up (first forward pass)
        image_ms, id_ms, kept_ms = [], [], []
        host, port = url.split("//")[1].split(":")
        kept = http.client.HTTPConnection(host, int(port), timeout=120)
        for i in range(args.queries):
            image_ms.append(_image_query_ms(url, files, feats.paths, i))
            body = json.dumps({"ids": [int(feats.row_ids[i % len(files)])], "k": 10}).encode()
            t = time.perf_counter()
            _post(url + "/search", body)
            id_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            kept.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
            answer = kept.getresponse()
            answer.read()
            kept_ms.append((time.perf_counter() - t) * 1e3)
            assert answer.status == 200 and not answer.will_close
        kept.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # the same image queries to a server that decodes them in its own process (--no-isolate-decode)
    # instead of a decoder process of its own (the default)
    proc, url = _start_server(embedx_cmd, work / "idx", env, "--no-isolate-decode")
    try:
        _post(url + "/search/image?k=10", files[0].read_bytes())  # warm-up
        inproc_ms = [_image_query_ms(url, files, feats.paths, i) for i in range(args.queries)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # under concurrent load: dynamic batching vs one request at a time, alternating fresh servers
    blobs = [f.read_bytes() for f in files]
    # (and batching with the queries decoded in the server's process: what isolating them costs)
    load = {1: [], 64: [], "64-in-process": []}
    for _ in range(args.rounds):
        for max_batch in (1, 64, "64-in-process"):
            extra = ["--max-batch", "64", "--no-isolate-decode"] if max_batch == "64-in-process" else ["--max-batch", str(max_batch)]
            proc, url = _start_server(embedx_cmd, work / "idx", env, *extra)
            try:
                load[max_batch].append(_concurrent(url, blobs, feats.paths, args.clients, args.concurrent))
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    med = {"cli_image_s": statistics.median(cli), "serve_image_ms": statistics.median(image_ms),
           "serve_id_ms": statistics.median(id_ms), "serve_id_kept_ms": statistics.median(kept_ms),
           "serve_image_no_isolate_ms": statistics.median(inproc_ms)}
    result = {
        "images": len(feats),
        "medians": med,
        "cli_over_serve_image": med["cli_image_s"] * 1e3 / med["serve_image_ms"],
        "isolated_over_in_process_image": med["serve_image_ms"] / med["serve_image_no_isolate_ms"],
        "serve_startup_s": startup,
        "concurrent": {"clients": args.clients, "requests": args.concurrent,
                       "one_at_a_time": load[1], "batched": load[64], "batched_no_isolate": load["64-in-process"],
                       "batched_over_one_at_a_time_qps": statistics.median(r["qps"] for r in load[64])
                       / statistics.median(r["qps"] for r in load[1]),
                       "isolated_over_in_process_qps": statistics.median(r["qps"] for r in load[64])
                       / statistics.median(r["qps"] for r in load["64-in-process"])},
        "runs": {"cli_image_s": cli, "serve_image_ms": image_ms, "serve_id_ms": id_ms, "serve_id_kept_ms": kept_ms,
                 "serve_image_no_isolate_ms": inproc_ms},
        "env": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "command": "python benchmarks/bench_serve.py" + (" --quick" if args.quick else f" --images {args.images}"),
    }
    print(f"{len(feats)} photos, Flat index, default model; image query = one ~500x375 JPEG")
    print(f"  embedx search (a process per query): {med['cli_image_s']:.2f} s")
    print(f"  embedx serve, image: {med['serve_image_ms']:.1f} ms   id: {med['serve_id_ms']:.1f} ms, "
          f"{med['serve_id_kept_ms']:.1f} ms on a kept connection   (started in {startup:.1f} s)")
    print(f"  image query, search/serve: {result['cli_over_serve_image']:.0f}x")
    print(f"  image query decoded in the server's process (--no-isolate-decode): {med['serve_image_no_isolate_ms']:.1f} ms; "
          f"in a decoder process of its own (the default): {result['isolated_over_in_process_image']:.2f}x that")
    for name, key in (("one request at a time (--max-batch 1)", 1), ("dynamic batching (--max-batch 64)", 64),
                      ("dynamic batching, decoded in the server's process", "64-in-process")):
        print(f"  {args.clients} clients, {name}: " + ", ".join(
            f"{r['qps']:.1f} img queries/s (p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, "
            f"{r['images_per_call']:.1f} images a backbone call)" for r in load[key]))
    print(f"  batched / one at a time: {result['concurrent']['batched_over_one_at_a_time_qps']:.2f}x queries/s; "
          f"batched, decoder process / in the server's: {result['concurrent']['isolated_over_in_process_qps']:.2f}x")
    write_result(result, "serve", args.quick, args.out)


if __name__ == "__main__":
    main()
