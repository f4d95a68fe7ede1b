"""The reward server: a FastAPI app over one `RewardSystem`, with dynamic batching.

Endpoints (see docs/SERVING.md): `POST /v1/score`, `POST /get_reward` (OpenRLHF's remote reward protocol),
`GET /health`, `GET /v1/info`, `GET /metrics` (Prometheus text).

The model loads in the background once the server starts: /health answers 503 `{"status": "loading"}` until it is
ready, then 200. Every request except /health must carry `Authorization: Bearer KEY` when an API key is set.

Request bodies are guarded before any handler sees them (`_BodyGuard`): a body over `max_body_bytes` is refused
with 413 (by its Content-Length, before it is read; a chunked one as soon as the count passes the limit), and one
that has not fully arrived `body_timeout_s` after its headers gets 408. The handlers then parse the JSON
themselves, so every way a body can be wrong has its own answer: 415 for a non-JSON Content-Type, 422 naming the
field for invalid UTF-8, invalid or too deeply nested JSON, wrong fields and text that cannot be encoded as UTF-8
(a lone surrogate such as "\\ud800"), 413 past the item, per-text and per-request character limits (the item
count is checked before the items are validated, so a huge list costs one `len`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moerm.cpu_memory import keep_cpu_memory
from moerm.errors import UserError
from moerm.serve.batcher import BatcherClosedError, DynamicBatcher, QueueFullError, ScoringError
from moerm.serve.config import MAX_DRAIN_BYTES, ServeConfig
from moerm.serve.engines import (
    EngineRequest, ProtocolError, activation, classify_response, count_inputs, embeddings_response, pooling_response,
    split_inputs,
)
from moerm.serve.forward import budget_score, length_fn, remember_encodings
from moerm.serve.metrics import CONTENT_TYPE, ServerMetrics
from moerm.integrations.logs import numeric_columns
from moerm.serve.openrlhf import TOKENIZER_PREFIX, QuerySplitter, SplitError, label_domain, run_backbone
from moerm.serve.reload import Marker, marker_path, read_marker, router_version
from moerm.systems.base import ScoreOutput

log = logging.getLogger("moerm.serve")

ENDPOINTS = ("/v1/score", "/get_reward", "/classify", "/pooling", "/v1/embeddings", "/v1/reload", "/health",
             "/v1/info", "/metrics")
VERSION_HEADER = "X-Moerm-Router-Version"  # on every scoring answer: the router version that scored it
OPEN_PATHS = frozenset({"/health"})  # no auth: load balancers and orchestrators probe it

# A run folder, a loaded system (anything with `score`), or a function that loads one.
SystemSource = Any

MAX_REPORTED_ERRORS = 20  # a 422 lists at most this many field errors (and says how many more there were)
_SURROGATE = re.compile("[\ud800-\udfff]")


# -- request bodies
class ScoreItem(BaseModel):
    """One (prompt, response) pair; `domain` routes it to that domain's expert when the system has one."""

    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    response: StrictStr
    domain: StrictStr | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ScoreItem]


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward request. Unknown keys are ignored: OpenRLHF versions differ in what they add."""

    model_config = ConfigDict(extra="ignore")
    query: list[StrictStr]
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None


# -- JSON-safe results
def _jsonable(value: Any) -> Any:
    """Details as plain JSON: tensors and numpy values become lists / numbers, NaN and inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return _jsonable(value.tolist())
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _reward(value: Any) -> float | None:
    v = float(value)
    return v if math.isfinite(v) else None


def system_score_fn(system: Any, batch_size: int, max_batch_tokens: int | None = None) -> Callable[..., ScoreOutput]:
    """The batcher's scoring function: `system.score`, with JSON-safe rewards and details; with a token budget,
    as forward passes of similar lengths filled up to it (`moerm.serve.forward`)."""
    run: Callable[..., ScoreOutput] = system.score
    if max_batch_tokens is not None:
        run = budget_score(system.score, length_fn(system)[0], max_batch_tokens, batch_size)

    def score(prompts: list[str], responses: list[str], domains: list[str | None] | None) -> ScoreOutput:
        out = run(prompts, responses, domains, batch_size=batch_size)
        return ScoreOutput([_reward(r) for r in out.rewards], [_jsonable(d) for d in out.details])  # type: ignore[misc]

    return score


def system_info(system: Any) -> dict[str, Any]:
    """What /v1/info reports about the loaded system: name, domains, backbone, parameters per component."""
    info: dict[str, Any] = {"system": getattr(system, "name", type(system).__name__),
                            "domains": list(getattr(system, "domains", None) or [])}
    describe = getattr(system, "describe", None)
    if callable(describe):
        d = describe()
        info.update({"backbone": d.get("backbone"), "tuning": d.get("tuning"), "parameters": d.get("total"),
                     "components": d.get("components")})
        if d.get("quantized"):
            info["quantized"] = d["quantized"]
    return _jsonable(info)


def _backbone(system: Any) -> str | None:
    """The backbone a loaded reward system was built on (`config.model.backbone`), or None for other objects."""
    backbone = getattr(getattr(getattr(system, "config", None), "model", None), "backbone", None)
    return backbone if isinstance(backbone, str) else None


def _loader(source: SystemSource, cfg: ServeConfig) -> Callable[[], Any]:
    """A function (run in a worker thread at start-up) that sets torch's threads and returns the system."""
    if isinstance(source, (str, Path)):
        from moerm.systems.base import load_system

        get = lambda: load_system(source, cfg.device, quantize=cfg.quantize)
    elif hasattr(source, "score"):
        get = lambda: source
    elif callable(source):
        get = source
    else:
        raise TypeError(f"expected a run folder, a reward system or a loader function; got {type(source).__name__}")

    def load() -> Any:
        keep_cpu_memory()  # also where no CLI started the process (a Ray replica, an embedding app)
        if cfg.torch_threads is not None:
            import torch

            torch.set_num_threads(cfg.torch_threads)  # process-wide, before the model's first use
        return get()

    return load


# -- errors
class RequestRejected(Exception):
    """A request refused with `status`; each problem is (field, message). `reason` counts it in /metrics."""

    def __init__(self, status: int, problems: Sequence[tuple[str, str]], reason: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.status, self.problems, self.reason, self.headers = status, list(problems), reason, headers


def _problem_body(problems: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {"detail": "; ".join(f"{field}: {msg}" for field, msg in problems),
            "errors": [{"field": field, "message": msg} for field, msg in problems]}


def _field_message(err: dict[str, Any]) -> tuple[str, str]:
    """(field path, message) of one pydantic error, e.g. ('items.0.response', 'Input should be a valid string')."""
    loc = [str(x) for x in err.get("loc", ())]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        at = f" at position {loc[0]}" if loc else ""
        return "body", f"invalid JSON{at}: {reason}".rstrip(": ")
    return ".".join(loc) or "body", str(err.get("msg", "invalid"))


def _capped(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if len(problems) <= MAX_REPORTED_ERRORS:
        return problems
    return problems[:MAX_REPORTED_ERRORS] + [("body", f"... and {len(problems) - MAX_REPORTED_ERRORS} more errors")]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(status_code=422, content=_problem_body(_capped([_field_message(e) for e in exc.errors()])))


def _reject(status: int, field: str, message: str, reason: str | None = None) -> RequestRejected:
    return RequestRejected(status, [(field, message)], reason)


def _unprocessable(field: str, message: str) -> RequestRejected:
    return _reject(422, field, message)


# -- reading a JSON body
def _media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    return None if value is None else value.split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def parse_json_body(body: bytes) -> Any:
    """The JSON value of a request body (UTF-8, as RFC 8259 says); RequestRejected(422) saying why it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _reject(422, "body", f"not valid UTF-8 at byte {e.start} ({e.reason}); send JSON encoded as UTF-8",
                      "invalid_body") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _reject(422, "body", f"invalid JSON at position {e.pos}: {e.msg}", "invalid_body") from None
    except RecursionError:  # the parser's nesting limit (Python's recursion limit, about 1000 levels)
        raise _reject(422, "body", "JSON nested too deeply; a request is at most a few levels deep",
                      "invalid_body") from None
    except ValueError as e:  # an integer past Python's int-from-string digit limit (4300 digits)
        raise _reject(422, "body", f"a number the server will not read ({str(e).split(':')[0]}); numbers in a "
                      "request are small", "invalid_body") from None


# Bodies longer than this are parsed, validated and split in a worker thread, so a large one (a few MB of JSON:
# tens of ms of parsing, more of validation) does not hold up /health and every other request on the event loop.
OFF_LOOP_BYTES = 64 * 1024


async def _prepared(request: Request, work: Callable[[Any], Any]) -> Any:
    """`work(parsed JSON body)`: on the event loop for a small body, in a worker thread for one past
    OFF_LOOP_BYTES (its pure-Python validation and splitting then yield the loop to other requests)."""
    body = await _body_bytes(request)
    if len(body) <= OFF_LOOP_BYTES:
        return work(parse_json_body(body))
    return await asyncio.to_thread(lambda: work(parse_json_body(body)))


async def _body_bytes(request: Request) -> bytes:
    """The body of a request that must be JSON: 415 for another Content-Type (none given: read as JSON)."""
    media_type = _media_type(request)
    if media_type is not None and not _is_json(media_type):
        raise _reject(415, "Content-Type", f"{request.headers['content-type']!r} is not accepted; send the body "
                      "as JSON with Content-Type: application/json", "unsupported_media_type")
    return await request.body()


def _validate(model: type[BaseModel], data: Any, lists: dict[str, int]) -> Any:
    """`model` validated from parsed JSON. Lists named in `lists` longer than their limit are refused with 413
    first, so a million-item list is never turned into models."""
    if isinstance(data, dict):
        for name, limit in lists.items():
            value = data.get(name)
            if isinstance(value, list) and len(value) > limit:
                raise _reject(413, name, f"{len(value)} items, the limit is {limit} per request", "too_many_items")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [_field_message(err) for err in e.errors(include_url=False, include_input=False)]
        raise RequestRejected(422, _capped(problems), "invalid_body") from None


def unencodable_at(text: str) -> int | None:
    """Where `text` holds a lone surrogate (a str that cannot be encoded as UTF-8), or None."""
    if text.isascii():
        return None
    m = _SURROGATE.search(text)
    return None if m is None else m.start()


# -- state shared by the handlers
class ServerState:
    """The loaded system and its batcher, once ready; what /health reports until then."""

    def __init__(self, cfg: ServeConfig, metrics: ServerMetrics):
        self.cfg = cfg
        self.metrics = metrics
        self.status = "loading"  # loading | ready | error | stopping
        self.error: str | None = None
        self.system: Any = None
        self.batcher: DynamicBatcher | None = None
        self.info: dict[str, Any] = {}
        self.load_seconds: float | None = None
        self.splitter: QuerySplitter | None = None  # OpenRLHF's query format; set by create_app or once loaded
        self.decode: Callable[[list[int]], str] | None = None  # token ids -> text (the query format's tokenizer)
        self.lengths: Callable[[Sequence[str], Sequence[str]], list[int]] | None = None  # pairs -> token counts
        self.router_version: int | None = None  # of the loaded system
        self.loads = 0  # systems loaded so far (1 after start-up, +1 per live swap)
        self.marker: Marker | None = None  # the run's save marker when the loaded system was read
        self.reload_error: str | None = None  # why the last swap failed (the previous system kept serving)
        self.reload_lock = asyncio.Lock()

    def unavailable(self) -> HTTPException:
        retry = {"Retry-After": str(self.cfg.retry_after_s)}
        if self.status == "loading":
            return HTTPException(503, "the model is loading; retry shortly", headers=retry)
        if self.status == "error":
            return HTTPException(503, f"the model failed to load: {self.error}")
        return HTTPException(503, "the server is shutting down", headers=retry)

    async def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None,
                    field: str = "items") -> tuple[list[float], list[dict[str, Any]], int | None]:
        """Rewards, details and the router version that scored them, from the batcher. A scoring failure (this
        request scored on its own, see DynamicBatcher) names `field`, the request's list: 422 if the system
        rejected the input, else 500. A request is queued on the batcher of the system loaded when it arrives and
        finishes there, whatever is swapped in meanwhile."""
        if self.status != "ready" or self.batcher is None:
            raise self.unavailable()
        batcher, version = self.batcher, self.router_version  # read together, on the loop: one version
        try:
            rewards, details = await batcher.submit(prompts, responses, domains)
            return rewards, details, version
        except QueueFullError as e:
            self.metrics.observe_rejected("queue_full")
            raise HTTPException(503, str(e), headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        except BatcherClosedError:
            raise self.unavailable() from None
        except ScoringError as e:
            if isinstance(e.cause, UserError):  # the system rejected this input: the client's to fix
                raise _reject(422, field, f"cannot be scored: {e.cause}", "unscorable") from None
            log.error("scoring failed: %s", e)
            raise _reject(500, field, f"scoring failed: {e}") from None

    def check_limits(self, n_items: int, items_field: str, texts: Sequence[tuple[str, str | None]]) -> None:
        """413 past the item, per-text or per-request character limits; 422 for text not encodable as UTF-8."""
        cfg = self.cfg
        if n_items > cfg.max_items_per_request:
            self.metrics.observe_rejected("too_many_items")
            raise _reject(413, items_field, f"{n_items} items, the limit is {cfg.max_items_per_request} per request")
        total = 0
        for field, text in texts:
            if text is None:
                continue
            at = unencodable_at(text)
            if at is not None:
                self.metrics.observe_rejected("unencodable_text")
                raise _reject(422, field, f"not encodable as UTF-8: a lone surrogate (\\u{ord(text[at]):04x}) at "
                                          f"character {at}")
            if len(text) > cfg.max_chars_per_text:
                self.metrics.observe_rejected("text_too_long")
                raise _reject(413, field, f"{len(text)} characters, the limit is {cfg.max_chars_per_text} per text")
            total += len(text)
        if total > cfg.max_request_chars:
            self.metrics.observe_rejected("request_too_long")
            raise _reject(413, items_field, f"{total} characters in all, the limit is {cfg.max_request_chars} per "
                                            "request")


def _bearer_token(value: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` value (the scheme is case-insensitive), or None."""
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


def _reply(status: int, problems: Sequence[tuple[str, str]], close: bool = False) -> JSONResponse:
    return JSONResponse(_problem_body(problems), status_code=status, headers={"Connection": "close"} if close else None)


# -- the request body: bounded in size and in time, before anything parses it
class _BodyGuard:
    """Reads a request's whole body before the app runs: at most `max_body_bytes` (413 past it; a too-long
    Content-Length is refused without reading anything), within `body_timeout_s` of the headers (408 past it).
    The app then gets the body in one message.

    A 413 leaves the connection open so the client can finish sending and read the answer (closing with unread
    data would reset the connection and lose the 413): the server discards the rest unparsed, and the protocol
    (`moerm.serve.server.GuardedH11Protocol`) closes the connection if that takes more than MAX_DRAIN_BYTES
    (64 MiB) or `header_timeout_s`; a Content-Length past MAX_DRAIN_BYTES is closed at once. A 408 closes the
    connection at once."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg, metrics = self.state.cfg, self.state.metrics
        limit = cfg.max_body_bytes
        length: bytes | None = None
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
        if length is None and not chunked:  # HTTP/1.1: no body at all
            await self.app(scope, receive, send)
            return
        if length is not None and not chunked and int(length) > limit:  # h11 has checked it is a number
            metrics.observe_rejected("body_too_large")
            # A body longer than the server will discard: close at once rather than take some of it.
            refusal = _reply(413, [("body", (f"Content-Length is {int(length)} bytes, the limit is {limit} bytes "
                                             "(--max-body-bytes)"))], close=int(length) > MAX_DRAIN_BYTES)
            await refusal(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + cfg.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                metrics.observe_rejected("body_timeout")
                await _reply(408, [("body", (f"{size} bytes received in {cfg.body_timeout_s:g} s, not the whole "
                                             "body (--body-timeout-s)"))], close=True)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                metrics.observe_rejected("body_too_large")
                await _reply(413, [("body", f"more than {limit} bytes (--max-body-bytes)")])(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say it

        await self.app(scope, replay, send)


# -- auth + request metrics, as plain ASGI middleware (runs before the body is read, so 401 comes first)
class _Gate:
    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state
        key = state.cfg.api_key
        self.expected = key.encode() if key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.expected is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                token = _bearer_token(value)
                return token is not None and hmac.compare_digest(token, self.expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.state.metrics
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.request_started()
        try:
            if self._authorized(scope):
                await self.app(scope, receive, send_status)
            else:
                metrics.observe_rejected("unauthorized")
                response = JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer KEY)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_status)
        finally:
            metrics.request_finished()
            metrics.observe_request(endpoint, status, time.perf_counter() - t0)


def _model_name(source: SystemSource, cfg: ServeConfig) -> str:
    if cfg.model_name:
        return cfg.model_name
    if isinstance(source, (str, Path)):
        p = Path(source).resolve()
        return p.parent.name if p.name == "model" else p.name
    return str(getattr(source, "name", "moerm"))


def _id_decoder(spec: str, backbone: str | None) -> Callable[[list[int]], str] | None:
    """Token ids -> text with the tokenizer of the query format (`auto`: the run's backbone; `tokenizer:PATH`);
    None for a preset or a template string, which name no tokenizer."""
    if spec == "auto":
        name = backbone
    elif spec.startswith(TOKENIZER_PREFIX):
        name = spec[len(TOKENIZER_PREFIX):]
    else:
        return None
    if name is None:
        return None
    from moerm.encoding import load_tokenizer

    tok = load_tokenizer(name)
    size = len(tok)

    def decode(ids: list[int]) -> str:
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary (0..{size - 1})")
        return str(tok.decode(ids, skip_special_tokens=False))

    return decode


def create_app(source: SystemSource, cfg: ServeConfig | None = None, preloaded: Any = None) -> FastAPI:
    """The reward server app.

    Args:
        source: a run (or saved model) folder, a loaded `RewardSystem` (anything with its `score` signature), or a
            function returning one; it is loaded in a background thread when the server starts. A run folder is
            watched: a new version saved into it (`moerm add-domain`) is loaded and swapped in without a restart.
        cfg: batching, limits, auth and query-splitting settings.
        preloaded: the system already loaded from the run folder `source` (a Ray Serve replica loads it in its
            constructor, so it takes no traffic before it can score); served at start-up instead of loading it.
    """
    cfg = cfg or ServeConfig()
    first: list[tuple[Any, Marker | None]] = []
    if preloaded is not None:
        if not isinstance(source, (str, Path)):
            raise TypeError("preloaded goes with a run folder as the source")
        first.append((preloaded, read_marker(marker_path(source))))
    metrics = ServerMetrics()
    state = ServerState(cfg, metrics)
    load = _loader(source, cfg)
    run_dir = source if isinstance(source, (str, Path)) else None
    marker_file = marker_path(run_dir) if run_dir is not None else None
    model_name = _model_name(source, cfg)
    # The OpenRLHF query format; a wrong one or an unreadable tokenizer fails here, before the server listens.
    # `auto` reads the run's backbone: from the run folder, the given system, or (a loader function) once loaded.
    if cfg.query_template != "auto":
        state.splitter = QuerySplitter.from_spec(cfg.query_template, cfg.strip_tokens)
    elif isinstance(source, (str, Path)) or hasattr(source, "score"):
        backbone = run_backbone(source) if isinstance(source, (str, Path)) else _backbone(source)
        state.splitter = QuerySplitter.from_spec("auto", cfg.strip_tokens, backbone)

    def load_version() -> tuple[Any, dict[str, Any], Marker | None]:
        """(system, its info, the save marker read before it): in a worker thread."""
        if first:
            system, marker = first.pop()
        else:
            marker = read_marker(marker_file) if marker_file is not None else None
            system = load()
        return system, system_info(system), marker

    def batcher_for(system: Any) -> DynamicBatcher:
        batcher = DynamicBatcher(system_score_fn(system, cfg.batch_size, cfg.max_batch_tokens), max_batch=cfg.max_batch,
                                 max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue, batching=cfg.batching,
                                 metrics=metrics)
        batcher.start()
        return batcher

    def activate(system: Any, info: dict[str, Any], marker: Marker | None) -> DynamicBatcher | None:
        """Make `system` the one new requests go to (on the loop, in one step); the previous batcher, returned,
        finishes the requests already queued on it."""
        old = state.batcher
        state.system, state.info, state.batcher = system, info, batcher_for(system)
        state.lengths = length_fn(system)[0]
        remember_encodings(system, cfg.max_queue + cfg.max_batch)  # every pair waiting or in a call: tokenized once
        state.router_version, state.marker = router_version(system), marker
        state.loads += 1
        return old

    async def load_in_background() -> None:
        t0 = time.perf_counter()
        try:
            system, info, marker = await asyncio.to_thread(load_version)
            if state.splitter is None:  # `auto` with a loader function: the loaded system names its backbone
                state.splitter = await asyncio.to_thread(QuerySplitter.from_spec, cfg.query_template,
                                                         cfg.strip_tokens, _backbone(system))
            state.decode = await asyncio.to_thread(_id_decoder, cfg.query_template, _backbone(system))
        except Exception as e:  # noqa: BLE001  # reported by /health; the server stays up to say why
            state.status, state.error = "error", f"{type(e).__name__}: {e}"
            log.error("loading the reward system failed: %s", state.error)
            return
        if cfg.freeze_gc:
            # The model and its libraries are ~10^5-10^6 objects that live as long as the process: out of the cyclic
            # GC's reach, a full collection no longer walks them (~0.1 s, the event loop stalled meanwhile).
            gc.collect()
            gc.freeze()
        activate(system, info, marker)
        state.load_seconds = time.perf_counter() - t0
        if state.status == "loading":
            state.status = "ready"
            log.info("reward system %s ready in %.1f s", info.get("system"), state.load_seconds)

    async def swap(force: bool) -> dict[str, Any]:
        """Load the run again if its save marker moved (or `force`) and swap to it; the old system finishes the
        requests queued on it. A failed load keeps the old system serving and is reported."""
        async with state.reload_lock:
            if state.status != "ready":
                raise state.unavailable()
            before = state.router_version
            if not force and read_marker(marker_file) == state.marker:  # type: ignore[arg-type]
                return {"swapped": False, "router_version": before}
            try:
                system, info, marker = await asyncio.to_thread(load_version)
            except Exception as e:  # noqa: BLE001 - a save in progress or a broken one: keep serving the old
                state.reload_error = f"{type(e).__name__}: {e}"
                log.error("reloading %s failed, the loaded version keeps serving: %s", run_dir, state.reload_error)
                raise _reject(500, "run", f"reloading failed, version {before} keeps serving: "
                                          f"{state.reload_error}") from None
            if state.status != "ready":  # shutting down meanwhile: keep what runs
                raise state.unavailable()
            old = activate(system, info, marker)
            state.reload_error = None
            log.info("swapped to router version %s (was %s)", state.router_version, before)
        if old is not None:
            await old.close()  # its queued requests finish on the version they started with
        return {"swapped": True, "router_version": state.router_version, "previous_router_version": before}

    async def watch() -> None:
        while True:
            await asyncio.sleep(cfg.reload_poll_s)
            if state.status != "ready" or read_marker(marker_file) in (None, state.marker):  # type: ignore[arg-type]
                continue
            try:
                await swap(force=False)
            except (RequestRejected, HTTPException):
                pass  # logged and reported by /v1/info; tried again at the next change of the marker
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any one failure
                log.error("watching %s: %s", run_dir, e)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if first:
            await load_in_background()  # already loaded: ready before the first request
        else:
            task = asyncio.create_task(load_in_background(), name="moerm-load")
        watcher = (asyncio.create_task(watch(), name="moerm-watch")
                   if marker_file is not None and cfg.reload_poll_s > 0 else None)
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests have finished; anything still queued is scored first.
            state.status = "stopping"
            if task is not None:
                task.cancel()  # a load still running is abandoned (its thread finishes on its own)
            if watcher is not None:
                watcher.cancel()
            if state.batcher is not None:
                try:
                    await state.batcher.close()
                except asyncio.CancelledError:  # forced exit (a second Ctrl+C): stop without waiting
                    state.batcher.abort()

    app = FastAPI(title="moerm reward server", lifespan=lifespan)
    app.state.moerm = state

    async def rejected(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestRejected)
        if exc.reason:
            metrics.observe_rejected(exc.reason)
        return JSONResponse(_problem_body(exc.problems), status_code=exc.status, headers=exc.headers)

    app.add_exception_handler(RequestRejected, rejected)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_BodyGuard, state=state)
    app.add_middleware(_Gate, state=state)  # outermost: 401 before the body is read

    def answer(content: dict[str, Any], version: int | None) -> JSONResponse:
        return JSONResponse(content, headers={VERSION_HEADER: "none" if version is None else str(version)})

    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        """Rewards and their explanations (routing, expert weights, sub-scores) for prompt/response pairs.

        Body: `{"items": [{"prompt": str, "response": str, "domain": str | null}, ...]}` (see docs/SERVING.md)."""

        def prepare(data: Any) -> ScoreRequest:
            req = _validate(ScoreRequest, data, {"items": cfg.max_items_per_request})
            texts = [(f"items.{i}.{k}", getattr(it, k)) for i, it in enumerate(req.items)
                     for k in ("prompt", "response", "domain")]
            state.check_limits(len(req.items), "items", texts)
            return req

        req = await _prepared(request, prepare)
        rewards, details, version = await state.score([it.prompt for it in req.items],
                                                      [it.response for it in req.items],
                                                      [it.domain for it in req.items])
        return answer({"rewards": rewards, "details": details}, version)

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        """OpenRLHF's remote reward model protocol (`--remote_rm_url http://HOST:PORT/get_reward`).

        Body: `{"query": [str], "prompts": [str] (optional), "labels": [...] (optional)}`. With
        `labels_as_domain`, `labels[i]` names query i's domain (`openrlhf.label_domain`). `extra_logs` holds
        per-query columns of the route fields (`moerm.integrations.logs.numeric_columns`); OpenRLHF logs them."""
        limit = cfg.max_items_per_request

        def prepare(data: Any) -> tuple[list[str], list[str], list[str | None] | None]:
            req = _validate(RewardRequest, data, {"query": limit, "prompts": limit})
            if req.prompts is not None and len(req.prompts) != len(req.query):
                raise _unprocessable("prompts", f"{len(req.prompts)} prompts for {len(req.query)} queries; send one "
                                                "per query or none")
            if cfg.labels_as_domain and req.labels is not None and len(req.labels) != len(req.query):
                raise _unprocessable("labels", f"{len(req.labels)} labels for {len(req.query)} queries; send one "
                                               "per query or none")
            if state.splitter is None:  # `auto` waiting for the model to load
                raise state.unavailable()
            splitter = state.splitter
            # The limits count text, not padding: older clients pad every query of a micro-batch to the longest
            # (the raw body is bounded by max_body_bytes before it is read).
            texts: list[tuple[str, str | None]] = [(f"query.{i}", splitter.strip(q)) for i, q in enumerate(req.query)]
            texts += [(f"prompts.{i}", splitter.strip(p)) for i, p in enumerate(req.prompts or [])]
            state.check_limits(len(req.query), "query", texts)
            try:
                prompts, responses = splitter.split_all(req.query, req.prompts)
                domains = ([label_domain(x, i) for i, x in enumerate(req.labels)]
                           if cfg.labels_as_domain and req.labels is not None else None)
            except SplitError as e:
                what = "read a domain from it" if e.field == "labels" else "split into prompt and response"
                raise _unprocessable(f"{e.field}.{e.index}", f"cannot {what}: {e}") from None
            return prompts, responses, domains

        prompts, responses, domains = await _prepared(request, prepare)
        rewards, details, version = await state.score(prompts, responses, domains, field="query")
        extra_logs = numeric_columns(details, state.info.get("domains") or [])
        return answer({"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}, version)

    async def engine(request: Request, respond: Callable[..., dict[str, Any]], default_activation: bool,
                     field: str) -> JSONResponse:
        """The engines' protocols (moerm/serve/engines.py): split each input, score, answer in the engine's shape."""

        def prepare(data: Any) -> tuple[EngineRequest, list[str], list[str], int]:
            n = count_inputs(data)
            if n > cfg.max_items_per_request:
                raise _reject(413, "input", f"{n} inputs, the limit is {cfg.max_items_per_request} per request",
                              "too_many_items")
            req = _validate(EngineRequest, data, {})
            # characters and UTF-8 first (a lone surrogate must not reach a tokenizer), then the split
            raw = req.input if isinstance(req.input, list) and req.input and isinstance(req.input[0], str) else (
                [req.input] if isinstance(req.input, str) else [])
            state.check_limits(n, "input", [(f"input.{i}", t) for i, t in enumerate(raw)])
            if state.splitter is None and req.messages is None:
                raise state.unavailable()
            try:
                inputs = split_inputs(req, state.splitter, state.decode)
            except ProtocolError as e:
                raise _unprocessable(e.field, str(e)) from None
            state.check_limits(len(inputs.prompts), "input", inputs.texts)
            lengths = state.lengths  # the tokens the model reads, for `usage` (tokenizing: off the loop when large)
            tokens = sum(lengths(inputs.prompts, inputs.responses)) if lengths is not None else 0
            return req, inputs.prompts, inputs.responses, tokens

        req, prompts, responses, tokens = await _prepared(request, prepare)
        rewards, _, version = await state.score(prompts, responses, None, field=field)
        return answer(respond(req.model or model_name, rewards, activation(req, default_activation), tokens), version)

    @app.post("/classify")
    async def classify(request: Request) -> JSONResponse:
        """vLLM's classification protocol (verl's reward loop with a vLLM reward model): one score per input in
        `data[i].probs`; sigmoid(reward) unless `use_activation` / `activation` is false (then the reward)."""
        return await engine(request, classify_response, True, "input")

    @app.post("/pooling")
    async def pooling(request: Request) -> JSONResponse:
        """vLLM's pooling protocol: the reward of each input in `data[i].data` (raw unless activation is asked)."""
        return await engine(request, pooling_response, False, "input")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        """SGLang's reward-model protocol (verl's reward loop with an SGLang RM): the reward in `embedding`."""
        return await engine(request, embeddings_response, False, "input")

    @app.post("/v1/reload")
    async def reload() -> dict[str, Any]:
        """Load the run folder again and swap to it now (behind the API key; requests in flight finish on the
        version they started with). 403 when the server has no API key, 409 when it was not given a run folder."""
        if cfg.api_key is None:
            raise _reject(403, "Authorization", "reloading needs an API key: start the server with one "
                                                "($MOERM_API_KEY or --api-key-file); polling the run folder "
                                                "(--reload-poll-s) needs none")
        if marker_file is None:
            raise _reject(409, "run", "the server was given a loaded system, not a run folder: nothing to reload")
        return await swap(force=True)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded; 503 while loading, after a failed load, or while shutting down."""
        if state.status == "ready":
            return JSONResponse({"status": "ready", "system": state.info.get("system")})
        body: dict[str, Any] = {"status": state.status}
        if state.error:
            body["error"] = state.error
        headers = {"Retry-After": str(cfg.retry_after_s)} if state.status == "loading" else None
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        """The loaded system (name, domains, backbone, parameters, router version) and the server's settings."""
        if state.status != "ready":
            raise state.unavailable()
        query_format = state.splitter.format.describe() if state.splitter is not None else None
        return {**state.info, "router_version": state.router_version, "loads": state.loads,
                "reload_error": state.reload_error, "model": model_name, "load_seconds": state.load_seconds,
                "server": {**cfg.public(), "query_format": query_format}}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Requests, pairs scored, batch sizes, latency histogram and queue depth, in Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
