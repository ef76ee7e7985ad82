"""`embedx serve`: an index behind a small HTTP/JSON service (standard library only), with the
index and the backbone for image queries loaded once instead of on every `embedx search`.

    GET  /              what is served: rows, dim, metric, factory, model, whether images work
    POST /search        JSON: one of {"vectors": [[...], ...]}, {"ids": [42, ...]} or
                        {"images": ["<base64 of an image file>", ...]}, plus optional "k" (10),
                        "labels" (["cat", ...]: neighbours with one of them) and, for ids,
                        "exclude_self"
    POST /search/image  one image file as the request body (`curl --data-binary @q.jpg`), with
                        ?k=5&label=cat in the URL
    GET  /image/ROW_ID  that indexed image as a JPEG within ?size=256 pixels (for showing results)

With a token (`--token`, or EMBEDX_SERVE_TOKEN), every request must carry `Authorization: Bearer
TOKEN` (or, for GET /image/ROW_ID in an <img> tag, `?token=TOKEN`); others get status 401.

Answers: {"results": [{"query": ..., "results": [{"rank", "row_id", "path", "score", "label"}]}],
"failures": [{"query": ..., "error": ...}]} (images that could not be decoded). A bad request
gets status 400 and {"error": "what is wrong and what to send"}.

Searches run concurrently (one thread per request; FAISS searches are thread-safe). Image
queries are batched dynamically: the images of requests that arrive while the backbone is busy
are embedded together in its next call (up to --max-batch images; `embedx.microbatch`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import index as fx
from .errors import EmbedxError, InputError, SearchIndexError
from .microbatch import BatcherClosed, MicroBatcher
from .query import QueryEncoder, SearchIndex, SearchResult, search_ids

log = logging.getLogger(__name__)

#: request bodies larger than this are refused (413): a few dozen photos, base64-encoded
MAX_BODY_BYTES = 64 * 2**20
#: and so are more queries than this in one request, and more neighbours than this a query
MAX_QUERIES = 1024
MAX_K = 10_000
#: seconds a client may take to send its request (a stalled one would hold a thread forever)
REQUEST_TIMEOUT = 60
#: most query images embedded in one call of the backbone, from the requests queued meanwhile
MAX_BATCH = 64


class SearchService:
    """What the server answers with, apart from HTTP: usable on its own.

    Args:
        idx: a loaded index. When its index.json changes on disk (`embedx index add`, a rebuild),
            the next request loads it again.
        encoder: embeds image queries, or None when image queries cannot be served.
        no_images: why image queries cannot be served (said to whoever sends one).
        weights: where the encoder's weights are, if they moved (for an index rebuilt over
            features of another backbone).
        max_batch: most query images embedded together, from requests that arrive while the
            backbone is busy (1: one request at a time).
        isolate: whether an encoder this service makes for a rebuilt index decodes query images
            in a process of its own (`QueryEncoder(isolate=...)`; `open` makes the first one so).
    """

    def __init__(self, idx: SearchIndex, encoder: QueryEncoder | None, no_images: str | None = None,
                 weights: str | None = None, max_batch: int = MAX_BATCH, isolate: bool = True):
        if max_batch < 1:
            raise InputError(f"--max-batch must be 1 or more, not {max_batch}")
        self._idx = idx
        self.weights = weights  # where the encoder's weights came from, for a rebuilt index
        self._stamp = _stamp(idx.directory)
        self._reload_lock = threading.Lock()
        self.max_batch = max_batch
        self.isolate = isolate
        self._embedding: tuple[QueryEncoder | None, MicroBatcher | None] = (None, None)
        self._set_encoder(encoder)
        self.no_images = no_images or "image queries are not served here"

    @property
    def encoder(self) -> QueryEncoder | None:
        return self._embedding[0]

    def _set_encoder(self, encoder: QueryEncoder | None) -> None:
        old_encoder, old = self._embedding
        batcher = MicroBatcher(_embed_each(encoder), self.max_batch) if encoder is not None else None
        self._embedding = (encoder, batcher)  # one assignment: requests see both or neither
        if old is not None:
            old.close()  # answers what it has queued, then its thread ends
        if old_encoder is not None and old_encoder is not encoder:
            old_encoder.close()  # (its decoder process, if any)

    def close(self) -> None:
        """Stop the image-embedding thread (after the requests it has queued)."""
        self._set_encoder(None)

    @property
    def idx(self) -> SearchIndex:
        """The index as it is on disk now: after `embedx index add` (which writes index.json
        last) the next request loads the grown index; requests under way keep the one they had."""
        stamp = _stamp(self._idx.directory)
        if stamp is not None and stamp != self._stamp:
            with self._reload_lock:
                if stamp != self._stamp:
                    try:
                        idx = SearchIndex(self._idx.directory)
                    except (EmbedxError, OSError, RuntimeError) as e:  # caught mid-rewrite: keep the one loaded
                        log.warning("%s changed but cannot be loaded yet (%s); still serving the index loaded before",
                                    self._idx.directory, e)
                        return self._idx
                    log.info("reloaded %s: %d rows (was %d)", idx.directory, len(idx), len(self._idx))
                    if idx.provenance != self._idx.provenance and self.encoder is not None:
                        # rebuilt over other features (`index --overwrite`): queries must be embedded
                        # as those were, or they land in another space
                        self._new_encoder(idx.provenance)
                    self._idx, self._stamp = idx, stamp
        return self._idx

    def _new_encoder(self, provenance: dict) -> None:
        # (called under _reload_lock: one backbone load at a time)
        encoder, why = _encoder(provenance, self.weights, self.encoder.device, self.isolate)
        self._set_encoder(encoder)
        self.no_images = why or self.no_images

    @classmethod
    def open(cls, index_dir, *, weights: str | None = None, device: str = "auto", images: bool = True,
             max_batch: int = MAX_BATCH, isolate: bool = True) -> "SearchService":
        """Load an index directory and, with `images`, its backbone. A backbone that cannot be
        rebuilt (weights moved, random weights) leaves image queries off, with the reason
        logged and given to each image query; vectors and ids are still served. `isolate`: query
        images are decoded in a process of their own, so that one that crashes the decoding
        library costs that image an error (`decoder_crashed`), not the server its life."""
        idx = SearchIndex(index_dir)
        if not images:
            return cls(idx, None, "image queries are off on this server (started with --no-images)", max_batch=max_batch)
        encoder, why = _encoder(idx.provenance, weights, device, isolate)
        return cls(idx, encoder, why, weights=weights, max_batch=max_batch, isolate=isolate)

    def image(self, row_id: int, size: int = 256) -> bytes:
        """An indexed image as a JPEG thumbnail, by row id."""
        from .sheet import thumbnail_jpeg

        if not 16 <= size <= 4096:
            raise InputError(f"size must be 16 to 4096 pixels, not {size}")
        idx = self.idx
        path = idx.absolute_path(idx.position_of(row_id))
        data = thumbnail_jpeg(path, size)
        if data is None:
            raise InputError(f"row {row_id}'s image ({path}) cannot be read any more")
        return data

    def describe(self) -> dict:
        idx = self.idx
        info, prov = idx.info, idx.provenance
        batcher = self._embedding[1]
        return {
            "index": str(idx.directory), "rows": len(idx), "dim": info["dim"], "metric": info["metric"],
            "factory": info["factory"], "model": prov.get("model"), "images": self.encoder is not None,
            "labels": len({lab for lab in idx.rows.labels if lab is not None}),
            # image queries so far (since the backbone was last loaded): backbone calls and the
            # images they embedded (images / calls: how much the dynamic batching gathers)
            "image_batches": {"calls": batcher.calls, "images": batcher.items, "max_batch": self.max_batch}
            if batcher is not None else None,
        }

    def search(self, request: dict) -> dict:
        """Answer a /search request (see the module docstring)."""
        if not isinstance(request, dict):
            raise InputError('send a JSON object, e.g. {"vectors": [[0.1, ...]], "k": 10}')
        unknown = set(request) - {"vectors", "ids", "images", "k", "labels", "exclude_self"}
        if unknown:
            raise InputError(f"unknown fields {sorted(unknown)}: the request takes vectors, ids or images, "
                             "and k, labels, exclude_self")
        kinds = [kind for kind in ("vectors", "ids", "images") if kind in request]
        if len(kinds) != 1:
            raise InputError('give exactly one of "vectors", "ids" or "images"')
        kind, queries = kinds[0], request[kinds[0]]
        if not isinstance(queries, list) or not queries:
            raise InputError(f'"{kind}" must be a non-empty list')
        if len(queries) > MAX_QUERIES:
            raise InputError(f"at most {MAX_QUERIES} queries a request, not {len(queries)}")
        k, labels = _k(request.get("k", 10)), _labels(request.get("labels"))
        exclude_self = request.get("exclude_self", False)
        if not isinstance(exclude_self, bool):
            raise InputError('"exclude_self" must be true or false')
        if exclude_self and kind != "ids":
            raise InputError('"exclude_self" applies to "ids" queries (a vector or an upload is in no row)')
        if kind == "vectors":
            try:
                xq = np.asarray(queries, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError('"vectors" must be a list of lists of numbers, all of the same length') from None
            if xq.ndim != 2:
                raise InputError('"vectors" must be a list of lists of numbers, all of the same length')
            return _answer(self.idx.search(xq, k, names=[f"vector:{i}" for i in range(len(xq))], labels=labels))
        if kind == "ids":
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in queries):
                raise InputError('"ids" must be a list of integer row ids')
            return _answer(search_ids(self.idx, queries, k, exclude_self, labels=labels))
        blobs = []
        for i, text in enumerate(queries):
            try:
                blobs.append(base64.b64decode(text, validate=True))
            except (binascii.Error, TypeError, ValueError):
                raise InputError(f'"images"[{i}] is not base64 (send each image file base64-encoded)') from None
        return self.search_images(blobs, k, labels)

    def search_images(self, blobs: list[bytes], k: int = 10, labels: list[str] | None = None) -> dict:
        """Embed image files given as bytes with the index's backbone and search them."""
        with tempfile.TemporaryDirectory(prefix="embedx-serve-") as tmp:
            files = []
            for i, blob in enumerate(blobs):
                f = Path(tmp) / f"image-{i}"
                f.write_bytes(blob)
                files.append(str(f))
            while True:
                encoder, batcher = self._embedding  # (a reload may swap them meanwhile)
                if encoder is None:
                    raise InputError(self.no_images + "; query by vectors or ids")
                try:
                    outs = batcher.submit(files)  # embedded with the images of requests queued meanwhile
                    break
                except BatcherClosed:  # swapped for a rebuilt index's backbone: use the new one
                    continue
        names = [f"image:{i}" for i in range(len(blobs))]
        ok = [n for n, (e, _) in zip(names, outs) if e is not None]
        failures = [{"query": n, "error": f"{err[0]}: {err[1]}"} for n, (e, err) in zip(names, outs) if e is None]
        if not ok:
            return _answer([], failures)
        emb = np.stack([e for e, _ in outs if e is not None])
        return _answer(self.idx.search(emb, k, names=ok, labels=labels), failures)


def _embed_each(encoder: QueryEncoder):
    """The batched function of a MicroBatcher: files -> per file (embedding, None) or (None,
    (error kind, message))."""

    def embed(files: list[str]) -> list:
        emb = encoder.embed(files)
        out, row = [], 0
        for good, err in zip(emb.ok, emb.errors):
            if good:
                out.append((emb.embeddings[row], None))
                row += 1
            else:
                out.append((None, err))
        return out

    return embed


def _encoder(provenance: dict, weights: str | None, device: str,
             isolate: bool = True) -> tuple[QueryEncoder | None, str | None]:
    """The backbone for image queries, or None and why not (logged: the server runs on without)."""
    try:
        # isolate: query images decoded in a process of their own; one that crashes the decoding
        # library costs that image an error and the server ~2-3 s to start another decoder
        return QueryEncoder(provenance, weights=weights, device=device, isolate=isolate), None
    except EmbedxError as e:
        log.warning("image queries are off: %s", e)
        return None, f"image queries are off on this server: {e}"


def _stamp(directory: Path) -> tuple[int, int] | None:
    """When index.json was last written (None while it is missing: an index being rebuilt)."""
    try:
        st = (Path(directory) / fx.INFO_FILE).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _k(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        raise InputError(f'"k" must be an integer from 1 to {MAX_K}, not {value!r}')
    return value


def _labels(value) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError('"labels" must be a list of strings')
    return value or None


def _answer(results: list[SearchResult], failures: list[dict] | None = None) -> dict:
    return {"results": [r.to_dict() for r in results], "failures": failures or []}


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8000,
                cors: str | None = None, token: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server for `service` (not started: call `serve_forever`; port 0 picks a free one,
    see `server.server_address`). `cors`: the Access-Control-Allow-Origin answered (a web page
    elsewhere may then call the API), e.g. "*". `token`: required of every request, as
    `Authorization: Bearer TOKEN` (or `?token=` on GET /image/ROW_ID)."""
    if token is not None and not token.strip():
        raise InputError("the token is empty: give a secret string, or no token")
    expected = token.encode() if token is not None else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "embedx"
        timeout = REQUEST_TIMEOUT  # also how long an idle kept-alive connection holds its thread
        # persistent connections: a client that keeps its connection (a browser loading result
        # thumbnails, requests.Session) skips a TCP handshake and a new server thread per request
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes: with Nagle's algorithm on a kept connection the
        # body waits for the client's delayed ACK of the headers, ~40 ms (measured: 42 ms an id
        # query on a kept connection, 1 ms on a new one)
        disable_nagle_algorithm = True

        def parse_request(self) -> bool:
            ok = super().parse_request()
            # a body not read (refused before reading it) would be taken for the next request on
            # a kept connection: such replies close the connection instead (`_send`)
            self._body_unread = ok and (self.headers.get("Content-Length", "0").strip() not in ("", "0")
                                        or "chunked" in self.headers.get("Transfer-Encoding", "").lower())
            return ok

        def _authorised(self, url) -> bool:
            """With a token: whether the request carries it; if not, the 401 is sent here."""
            if expected is None:
                return True
            header = self.headers.get("Authorization", "")
            given = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
            if given is None and url.path.startswith("/image/"):  # an <img> tag cannot send headers
                given = parse_qs(url.query).get("token", [None])[-1]
            if given is not None and hmac.compare_digest(given.encode(), expected):
                return True
            data = json.dumps({"error": "this server needs its token: send the header 'Authorization: Bearer TOKEN'"
                                        + ("" if given is None else " (the one sent is not it)")}).encode()
            self._send(HTTPStatus.UNAUTHORIZED, data, "application/json", {"WWW-Authenticate": 'Bearer realm="embedx"'})
            return False

        def do_GET(self):
            url = urlsplit(self.path)
            if not self._authorised(url):
                return
            if url.path in ("/", "/health"):
                return self._reply(HTTPStatus.OK, service.describe())
            if url.path.startswith("/image/"):
                try:
                    try:
                        row_id = int(url.path[len("/image/"):])
                        size = int(parse_qs(url.query).get("size", ["256"])[-1])
                    except ValueError:
                        raise InputError("GET /image/ROW_ID?size=PIXELS takes integers") from None
                    data = service.image(row_id, size)
                except SearchIndexError as e:  # no such row
                    return self._reply(HTTPStatus.NOT_FOUND, {"error": str(e)})
                except EmbedxError as e:
                    return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
                return self._send(HTTPStatus.OK, data, "image/jpeg")
            self._reply(HTTPStatus.NOT_FOUND, {"error": "GET / says what is served, GET /image/ROW_ID shows a row; "
                                                        "queries go to POST /search"})

        def do_OPTIONS(self):  # a browser's CORS preflight
            headers = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                       "Access-Control-Allow-Headers": "Content-Type, Authorization"} if cors else {}
            self._send(HTTPStatus.NO_CONTENT if cors else HTTPStatus.METHOD_NOT_ALLOWED, b"", None, headers)

        def do_POST(self):
            url = urlsplit(self.path)
            if not self._authorised(url):
                return
            if url.path not in ("/search", "/search/image"):
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /search (JSON) or /search/image (an image file)"})
            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if length < 0:
                return self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length header"})
            if length > MAX_BODY_BYTES:
                return self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   {"error": f"the body is {length} bytes; at most {MAX_BODY_BYTES} a request"})
            body = self.rfile.read(length)
            self._body_unread = False
            try:
                if url.path == "/search":
                    try:
                        request = json.loads(body)
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise InputError(f"the body is not JSON ({e})") from None
                    answer = service.search(request)
                else:
                    if not body:
                        raise InputError("send the image file as the request body (curl --data-binary @query.jpg)")
                    params = parse_qs(url.query)
                    try:
                        k = int(params.get("k", ["10"])[-1])
                    except ValueError:
                        raise InputError(f"k must be an integer, not {params['k'][-1]!r}") from None
                    answer = service.search_images([body], _k(k), params.get("label"))
            except EmbedxError as e:
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # a bug: keep serving, say so, log the traceback
                log.exception("error answering %s", self.path)
                return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {e!r}"})
            self._reply(HTTPStatus.OK, answer)

        def _reply(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: HTTPStatus, data: bytes, content_type: str | None, headers: dict | None = None) -> None:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            if self._body_unread:
                self.send_header("Connection", "close")
                self.close_connection = True
            self._cors()
            self.end_headers()
            self.wfile.write(data)

        def _cors(self) -> None:
            if cors:
                self.send_header("Access-Control-Allow-Origin", cors)

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            log.info("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
