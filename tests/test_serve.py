"""`embedx serve`: the HTTP service answers as the library does, on real photos and weights."""

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import embedx
from embedx.extractor import ExtractConfig, extract
from embedx.index import IndexConfig
from embedx.indexer import build_index
from embedx.query import QueryEncoder, SearchIndex, search_ids, search_images
from embedx.serve import SearchService, make_server


@pytest.fixture(scope="module")
def served(photo_dir, tmp_path_factory, backbone):
    tmp = tmp_path_factory.mktemp("serve")
    extract(photo_dir, tmp / "f", ExtractConfig(progress=False, num_workers=0), backbone=backbone)
    build_index(tmp / "f", tmp / "idx", IndexConfig(factory="Flat", num_queries=5))
    idx = SearchIndex(tmp / "idx")
    service = SearchService(idx, QueryEncoder(idx.provenance, backbone=backbone, device="cpu"))
    server = make_server(service, "127.0.0.1", 0, cors="*")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}", idx, embedx.read_features(tmp / "f")
    server.shutdown()
    server.server_close()


def _call(url, body=None, *, raw=False, json_answer=True, method=None):
    data = body if raw or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()) if json_answer else (r.read(), dict(r.headers))
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_vectors_ids_and_labels_answer_as_the_library(served):
    url, idx, feats = served
    status, info = _call(url + "/")
    assert status == 200 and info["rows"] == len(feats) and info["images"] and info["model"] == "tf_efficientnet_lite0"
    status, got = _call(url + "/search", {"vectors": feats.embeddings[:2].tolist(), "k": 3})
    assert status == 200 and got["failures"] == []
    want = [r.to_dict() for r in idx.search(feats.embeddings[:2], 3, names=["vector:0", "vector:1"])]
    assert got["results"] == want and got["results"][0]["results"][0]["row_id"] == int(feats.row_ids[0])
    label = feats.labels[3]
    status, got = _call(url + "/search", {"ids": [int(feats.row_ids[0])], "k": 2, "exclude_self": True, "labels": [label]})
    want = [r.to_dict() for r in search_ids(idx, [int(feats.row_ids[0])], 2, True, labels=[label])]
    assert status == 200 and got["results"] == want
    assert {n["label"] for n in got["results"][0]["results"]} == {label}


def test_image_queries_find_their_own_photo(served, photo_dir):
    url, idx, feats = served
    path = feats.paths[1]
    blob = (photo_dir / path).read_bytes()
    status, got = _call(url + "/search/image?k=2", blob, raw=True)
    assert status == 200, got
    [result] = got["results"]
    assert result["query"] == "image:0" and result["results"][0]["path"] == path
    assert result["results"][0]["score"] > 0.999  # the photo itself, embedded as the index was
    lib, _ = search_images(idx, [str(photo_dir / path)], k=2, device="cpu")
    assert [n["row_id"] for n in result["results"]] == [n.row_id for n in lib[0].neighbors]
    # several at once, base64 in JSON; one is not an image: it is a failure, the others answer
    other = (photo_dir / feats.paths[2]).read_bytes()
    images = [base64.b64encode(b).decode() for b in (blob, b"not an image", other)]
    status, got = _call(url + "/search", {"images": images, "k": 1})
    assert status == 200
    assert [r["query"] for r in got["results"]] == ["image:0", "image:2"]
    assert [r["results"][0]["path"] for r in got["results"]] == [path, feats.paths[2]]
    assert [f["query"] for f in got["failures"]] == ["image:1"] and got["failures"][0]["error"]


def test_result_images_are_served_as_jpegs_for_browsers(served, photo_dir):
    from PIL import Image

    url, idx, feats = served
    status, (data, headers) = _call(url + f"/image/{int(feats.row_ids[1])}?size=64", json_answer=False)
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and headers["Access-Control-Allow-Origin"] == "*"
    import io

    thumb = Image.open(io.BytesIO(data))
    with Image.open(photo_dir / feats.paths[1]) as orig:
        assert max(thumb.size) == 64 and abs(thumb.size[0] / thumb.size[1] - orig.size[0] / orig.size[1]) < 0.05
    status, got = _call(url + "/image/999999")
    assert status == 404 and "not in this index" in got["error"]
    status, got = _call(url + "/image/1?size=1")
    assert status == 400 and "16 to 4096" in got["error"]
    status, (_, headers) = _call(url + "/search", method="OPTIONS", json_answer=False)
    assert status == 204 and "POST" in headers["Access-Control-Allow-Methods"]


def test_bad_requests_get_400_with_what_to_send(served):
    url, idx, feats = served
    cases = [
        (b"{not json", "not JSON"),
        ({"vectors": [[0.1, 0.2]]}, "dimension 2"),
        ({"ids": [10**9]}, "not in this index"),
        ({"ids": [0], "vector": [1]}, "unknown fields"),
        ({"ids": [0], "vectors": [[1.0]]}, "exactly one of"),
        ({"ids": [0], "k": 0}, "integer from 1 to 10000"),
        ({"ids": [0], "k": 10**6}, "integer from 1 to 10000"),
        ({"ids": ["a"]}, "integer row ids"),
        ({"images": ["%%%"]}, "not base64"),
        ({"vectors": feats.embeddings[:1].tolist(), "exclude_self": True}, "applies to \"ids\""),
        ({"ids": [0], "labels": ["no-such-label"]}, "No indexed row has the label"),
    ]
    for body, message in cases:
        status, got = _call(url + "/search", body, raw=isinstance(body, bytes))
        assert status == 400 and message in got["error"], (body, got)
    status, got = _call(url + "/search/image", b"", raw=True)
    assert status == 400 and "--data-binary" in got["error"]
    status, got = _call(url + "/nowhere")
    assert status == 404 and "POST /search" in got["error"]


def test_concurrent_requests_each_get_their_own_answer(served):
    url, idx, feats = served
    n = len(feats)

    def ask(i):
        return _call(url + "/search", {"vectors": [feats.embeddings[i % n].tolist()], "k": 1})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(32)))
    assert all(status == 200 for status, _ in answers)
    assert [got["results"][0]["results"][0]["row_id"] for _, got in answers] == [int(feats.row_ids[i % n]) for i in range(32)]


def test_service_without_a_backbone_says_why_image_queries_fail(served):
    _, idx, _ = served
    service = SearchService(idx, None, "image queries are off on this server (started with --no-images)")
    with pytest.raises(embedx.errors.InputError, match="--no-images.*query by vectors or ids"):
        service.search({"images": [base64.b64encode(b"x").decode()]})


@contextlib.contextmanager
def _cli_server(index_dir, *options, **env):
    """`embedx serve INDEX_DIR --port 0 --no-images OPTIONS` in a subprocess (with `env` added to
    the environment, a None value removing that variable): yields (process, its first line)."""
    environ = dict(os.environ, HF_HUB_OFFLINE="1")
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    proc = subprocess.Popen([sys.executable, "-m", "embedx", "serve", str(index_dir), "--port", "0", "--no-images",
                             *options], stderr=subprocess.PIPE, text=True, env=environ)
    try:
        yield proc, proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_starts_answers_and_stops(served):
    _, idx, feats = served
    with _cli_server(idx.directory) as (_, line):
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        assert m and "image queries off" in line, line
        status, info = _call(m.group(1) + "/")
        assert status == 200 and info["rows"] == len(feats) and not info["images"]
        status, got = _call(m.group(1) + "/search", {"ids": [int(feats.row_ids[0])], "k": 1})
        assert status == 200 and got["results"][0]["results"][0]["row_id"] == int(feats.row_ids[0])


def test_cli_server_survives_an_image_that_crashes_the_decoder(served, photo_dir, tmp_path):
    """`embedx serve` with image queries, where decoding one upload segfaults (in the server and in
    any process it starts, as a crash in a decoding library would): that image is a failure, the
    others in its request are answered, and so is the next request, by the same server."""
    from .conftest import crash_on_content

    _, idx, feats = served
    good, other = (photo_dir / feats.paths[0]).read_bytes(), (photo_dir / feats.paths[2]).read_bytes()
    crash = good + b"crafted"  # the same picture, other bytes
    environ = dict(os.environ, HF_HUB_OFFLINE="1", **crash_on_content(tmp_path, crash))
    proc = subprocess.Popen([sys.executable, "-m", "embedx", "serve", str(idx.directory), "--port", "0",
                             "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=environ)
    try:
        line = proc.stderr.readline()
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        assert m and "image queries off" not in line, line
        images = [base64.b64encode(b).decode() for b in (good, crash, other)]
        status, got = _call(m.group(1) + "/search", {"images": images, "k": 1})
        assert status == 200, got
        assert [r["query"] for r in got["results"]] == ["image:0", "image:2"]
        assert [r["results"][0]["path"] for r in got["results"]] == [feats.paths[0], feats.paths[2]]
        [failure] = got["failures"]
        assert failure["query"] == "image:1" and failure["error"].startswith("decoder_crashed") \
            and "SIGSEGV" in failure["error"], failure
        status, got = _call(m.group(1) + "/search", {"images": images[2:], "k": 1})
        assert status == 200 and got["results"][0]["results"][0]["path"] == feats.paths[2]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_follows_the_index_as_it_grows_and_is_rebuilt(tmp_path):
    """index add while serving: the next request sees the new rows; a rebuild over features of
    another backbone makes the server embed image queries with that backbone."""
    from embedx import index as fx

    from .test_index import write_features

    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    build_index(write_features(tmp_path / "a", x[:200]), tmp_path / "i", IndexConfig(factory="Flat", num_queries=20))
    service = SearchService(SearchIndex(tmp_path / "i"), None)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://%s:%d" % server.server_address[:2]
    try:
        assert _call(url + "/")[1]["rows"] == 200
        status, got = _call(url + "/search", {"ids": [250]})
        assert status == 400 and "not in this index" in got["error"]
        from embedx.indexer import add_to_index

        add_to_index(tmp_path / "i", write_features(tmp_path / "b", x[200:], start_id=200))
        assert _call(url + "/")[1]["rows"] == 300
        status, got = _call(url + "/search", {"ids": [250], "k": 1})
        assert status == 200 and got["results"][0]["results"][0]["row_id"] == 250
        # a half-written index (index.json missing for a moment) keeps the loaded one in service
        info = (tmp_path / "i" / fx.INFO_FILE).read_bytes()
        (tmp_path / "i" / fx.INFO_FILE).unlink()
        assert _call(url + "/")[1]["rows"] == 300
        (tmp_path / "i" / fx.INFO_FILE).write_bytes(info)
    finally:
        server.shutdown()
        server.server_close()


def test_rebuilt_index_of_another_backbone_gets_its_encoder(served, tmp_path, monkeypatch):
    import embedx.serve as serve_mod

    url, idx, feats = served
    built = []

    class FakeEncoder:  # records which provenance the service asked for, loads nothing
        def __init__(self, provenance, *, weights=None, device="auto", isolate=False):
            built.append((provenance["model"], weights, device, isolate))
            self.device = device
            self.closed = False

        def close(self):
            self.closed = True

    first = FakeEncoder(idx.provenance, device="cpu")
    service = SearchService(SearchIndex(idx.directory), first, weights="w.pth")
    built.clear()
    monkeypatch.setattr(serve_mod, "QueryEncoder", FakeEncoder)
    info = json.loads((idx.directory / "index.json").read_text())
    try:
        service.idx  # unchanged: no new encoder
        assert built == []
        changed = dict(info, provenance=dict(info["provenance"], model="resnet18"))
        (idx.directory / "index.json").write_text(json.dumps(changed))
        # the new encoder decodes in a process of its own, as the server's first; the old one is closed
        assert service.idx.provenance["model"] == "resnet18" and built == [("resnet18", "w.pth", "cpu", True)]
        assert first.closed and not service.encoder.closed
    finally:
        (idx.directory / "index.json").write_text(json.dumps(info))


def test_a_stalled_client_does_not_hold_the_server(served, monkeypatch):
    """A client that announces a body and never sends it is dropped after the request timeout;
    other requests are answered meanwhile."""
    import socket

    import embedx.serve as serve_mod

    url, idx, feats = served
    monkeypatch.setattr(serve_mod, "REQUEST_TIMEOUT", 1)
    service = SearchService(SearchIndex(idx.directory), None)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    try:
        stalled = socket.create_connection((host, port))
        stalled.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes short
        assert _call(f"http://{host}:{port}/")[0] == 200  # answered while the other waits
        stalled.settimeout(10)
        assert stalled.recv(1024) == b""  # closed by the server once its timeout passed
        stalled.close()
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_image_queries_are_embedded_together_and_answered_apart(served, photo_dir, backbone):
    """Image requests that arrive while the backbone is busy share its next call; each answer
    is still its own photo's, as the library finds it."""
    import time

    _, idx, feats = served
    service = SearchService(SearchIndex(idx.directory), QueryEncoder(idx.provenance, backbone=backbone, device="cpu"))
    batcher = service._embedding[1]
    photos = sorted(photo_dir.rglob("*.jpg"))
    blobs = [p.read_bytes() for p in photos]
    entered, gate, real = threading.Event(), threading.Event(), service.encoder.embed
    calls = []

    def held_embed(files):  # the first call waits until every other request has queued
        calls.append(len(files))
        entered.set()
        gate.wait(30)
        return real(files)

    service.encoder.embed = held_embed
    try:
        with ThreadPoolExecutor(len(blobs) + 1) as pool:
            first = pool.submit(service.search_images, [blobs[0]], 1)
            assert entered.wait(30)
            others = [pool.submit(service.search_images, [b, b"not an image"], 1) for b in blobs[1:]]
            deadline = time.monotonic() + 30
            while batcher.pending() < len(others) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert batcher.pending() == len(others)
            gate.set()
            answers = [first.result()] + [f.result() for f in others]
    finally:
        service.close()
    assert calls == [1, 2 * len(others)]  # the first request alone, then all the others in one call
    assert service.describe()["image_batches"] is None  # closed
    want, _ = search_images(idx, [str(p) for p in photos], 1,
                            encoder=QueryEncoder(idx.provenance, backbone=backbone, device="cpu"))
    for photo, got, lib in zip(photos, answers, want):
        top = got["results"][0]["results"][0]
        assert top["path"].endswith(photo.name) and top["score"] > 0.999
        assert top["row_id"] == lib.neighbors[0].row_id and abs(top["score"] - lib.neighbors[0].score) < 1e-3
    for got in answers[1:]:  # the broken blob is that request's own failure
        assert [f["query"] for f in got["failures"]] == ["image:1"]


def test_image_batches_are_counted_in_the_description(served, photo_dir, backbone):
    _, idx, _ = served
    service = SearchService(SearchIndex(idx.directory), QueryEncoder(idx.provenance, backbone=backbone, device="cpu"),
                            max_batch=8)
    blob = sorted(photo_dir.rglob("*.jpg"))[0].read_bytes()
    service.search_images([blob, blob], 1)
    assert service.describe()["image_batches"] == {"calls": 1, "images": 2, "max_batch": 8}
    service.close()
    with pytest.raises(embedx.errors.InputError, match="--max-batch"):
        SearchService(SearchIndex(idx.directory), None, max_batch=0)


def _call_with(url, body=None, headers=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_a_token_is_required_of_every_request_when_set(served):
    _, idx, feats = served
    service = SearchService(SearchIndex(idx.directory), None, "no images here")
    server = make_server(service, "127.0.0.1", 0, cors="*", token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}"
    query = {"ids": [int(feats.row_ids[0])], "k": 1}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path, body in (("/", None), ("/search", query), (f"/image/{int(feats.row_ids[0])}", None)):
                status, data, hdrs = _call_with(url + path, body, headers)
                assert status == 401, (path, headers)
                assert "Authorization: Bearer TOKEN" in json.loads(data)["error"]
                assert hdrs["WWW-Authenticate"].startswith("Bearer")
        ok = {"Authorization": "Bearer s3cret"}
        status, data, _ = _call_with(url + "/search", query, ok)
        assert status == 200 and json.loads(data)["results"][0]["results"][0]["row_id"] == int(feats.row_ids[0])
        status, data, hdrs = _call_with(url + f"/image/{int(feats.row_ids[0])}", None, ok)
        assert status == 200 and hdrs["Content-Type"] == "image/jpeg"
        # an <img src> cannot send headers: the image route takes ?token= (and only it does)
        assert _call_with(url + f"/image/{int(feats.row_ids[0])}?token=s3cret")[0] == 200
        assert _call_with(url + f"/image/{int(feats.row_ids[0])}?token=nope")[0] == 401
        assert _call_with(url + "/?token=s3cret")[0] == 401
        # a browser's CORS preflight carries no credentials; it must be let through and allow the header
        status, _, hdrs = _call_with(url + "/search", None, {"Origin": "http://x", "Access-Control-Request-Method": "POST"},
                                     method="OPTIONS")
        assert status == 204 and "Authorization" in hdrs["Access-Control-Allow-Headers"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(embedx.errors.InputError, match="token is empty"):
        make_server(service, "127.0.0.1", 0, token="  ")


def test_cli_serve_takes_the_token_from_the_environment_and_warns_without_one(served):
    _, idx, _ = served
    with _cli_server(idx.directory, EMBEDX_SERVE_TOKEN="from-env") as (_, line):
        m = re.search(r"on (http://[\d.]+:\d+)", line)
        assert m and "token required" in line, line
        assert _call_with(m.group(1) + "/")[0] == 401
        assert _call_with(m.group(1) + "/", None, {"Authorization": "Bearer from-env"})[0] == 200
    with _cli_server(idx.directory, "--host", "0.0.0.0", EMBEDX_SERVE_TOKEN=None) as (proc, _):
        warning = proc.stderr.readline()
        assert "no token" in warning and "EMBEDX_SERVE_TOKEN" in warning, warning


def test_connections_are_kept_between_requests_unless_a_body_was_left_unread(served):
    """HTTP/1.1 keep-alive: several requests on one connection; a request refused before its
    body was read (here: no token) closes its connection, so the body is never taken for the
    next request."""
    import http.client

    _, idx, feats = served
    service = SearchService(SearchIndex(idx.directory), None, "no images here")
    server = make_server(service, "127.0.0.1", 0, token="t0k")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    ok = {"Authorization": "Bearer t0k", "Content-Type": "application/json"}
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        socks = []
        for i in range(3):
            body = json.dumps({"ids": [int(feats.row_ids[i])], "k": 1})
            conn.request("POST", "/search", body=body, headers=ok)
            r = conn.getresponse()
            got = json.loads(r.read())
            assert r.status == 200 and got["results"][0]["results"][0]["row_id"] == int(feats.row_ids[i])
            assert r.getheader("Connection") != "close"
            socks.append(conn.sock)
        assert socks[0] is not None and socks[0] is socks[1] is socks[2]  # one connection throughout
        conn.request("GET", "/", headers=ok)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["rows"] == len(feats) and conn.sock is socks[0]
        # refused with its body unread: the server says it closes, and does
        conn.request("POST", "/search", body=json.dumps({"ids": [0], "k": 1}), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 401 and r.getheader("Connection") == "close"
        r.read()
        assert r.will_close
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.request("GET", "/", headers=ok)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_encoder_that_cannot_load_leaves_no_decoder_process(served, monkeypatch):
    """The decoder process starts before the backbone loads (its imports overlap); when the
    backbone cannot be loaded, it is ended, not left behind."""
    from embedx import _isolated

    made = []

    class Recorded(_isolated.DecodeProcess):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(_isolated, "DecodeProcess", Recorded)
    _, idx, _ = served
    prov = dict(idx.provenance, weights_sha256="0" * 64)  # weights that are nowhere
    with pytest.raises(embedx.errors.EmbedxError):
        QueryEncoder(prov, device="cpu", isolate=True)
    [decoder] = made
    assert decoder.starts == 1 and decoder._proc is None and decoder._closed
