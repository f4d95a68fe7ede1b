"""The reward server against bad, oversized and slow clients: a real uvicorn on a loopback port.

`test_a_bad_request_fails_alone` is the table of bad requests: each is sent while the scoring worker is held, beside
good requests that queue with it (and share its batch when it gets that far); each must get its status and a
message naming the field, and every good request its own, right reward.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from moerm.errors import UserError
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems.base import ScoreOutput

MAX_BODY = 256 * 1024
LIMITS = {"max_items_per_request": 8, "max_chars_per_text": 1000, "max_request_chars": 3000,
          "max_body_bytes": MAX_BODY, "body_timeout_s": 1.0, "header_timeout_s": 1.0, "max_wait_ms": 20}


class Model:
    """`RewardSystem.score`'s signature; reward = len(prompt) + len(response) / 1000.

    Like a real tokenizer it encodes every text as UTF-8 (a lone surrogate raises there). A prompt "poison"
    makes the call raise RuntimeError, "unscorable" a UserError. `gate` holds every call until set."""

    name = "fake"
    domains = ("x", "y")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def score(self, prompts: Any, responses: Any, domains: Any = None, batch_size: int = 32) -> ScoreOutput:
        self.calls.append(list(prompts))
        self.entered.set()
        assert self.gate.wait(30)
        for text in [*prompts, *responses, *(d for d in domains or [] if d is not None)]:
            text.encode("utf-8")
        if "poison" in prompts:
            raise RuntimeError("the tokenizer choked")
        if "unscorable" in prompts:
            raise UserError("no expert for this input")
        return ScoreOutput([want(p, r) for p, r in zip(prompts, responses)], [{} for _ in prompts])


def want(prompt: str, response: str) -> float:
    return len(prompt) + len(response) / 1000


def ok(i: int) -> dict[str, str]:
    return {"prompt": "p" * (i + 1), "response": "r" * i}


def as_json(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # ASCII escapes: a lone surrogate travels as \ud800, as a client would send it


def chunks(total: int, size: int = 16 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


@dataclass
class Bad:
    """One bad request: what is sent, and the status and the field the answer must name."""

    id: str
    body: Any  # bytes, or an iterator of bytes (sent chunked)
    status: int
    field: str
    path: str = "/v1/score"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    says: str = ""  # a further piece of the message


SURROGATE_ITEMS = [ok(1), ok(2), ok(3), {"prompt": "p", "response": "bad \ud800 text"}]
BAD = [
    Bad("surrogate-response", as_json({"items": SURROGATE_ITEMS}), 422, "items.3.response", says="UTF-8"),
    Bad("surrogate-domain", as_json({"items": [{**ok(1), "domain": "\udfff"}]}), 422, "items.0.domain"),
    Bad("surrogate-query", as_json({"query": ["<|im_start|>user\nq\ud83d<|im_end|>\n<|im_start|>assistant\na"]}),
        422, "query.0", path="/get_reward"),
    Bad("surrogate-prompts", as_json({"query": ["qa"], "prompts": ["\ud800"]}), 422, "prompts.0", path="/get_reward"),
    Bad("wrong-type", as_json({"items": [ok(1), {"prompt": "p", "response": 5}]}), 422, "items.1.response",
        says="valid string"),
    Bad("extra-field", as_json({"items": [{**ok(1), "respnse": "typo"}]}), 422, "items.0.respnse"),
    Bad("missing-field", as_json({"itemz": []}), 422, "items", says="Field required"),
    Bad("not-an-object", as_json([ok(1)]), 422, "body"),
    Bad("form-content-type", b"prompt=p&response=r", 415, "Content-Type", says="application/json",
        headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Bad("invalid-utf8", b'{"items": [{"prompt": "\xff\xfe", "response": "r"}]}', 422, "body", says="UTF-8"),
    Bad("invalid-json", b'{"items": [', 422, "body", says="invalid JSON at position"),
    Bad("deep-json", b"[" * 100_000 + b"]" * 100_000, 422, "body", says="nested too deeply"),
    Bad("too-many-items", as_json({"items": [ok(1)] * 9}), 413, "items", says="9 items, the limit is 8"),
    Bad("million-items", as_json({"items": [{}] * 50_000}), 413, "items", says="50000 items"),
    Bad("text-too-long", as_json({"items": [{"prompt": "p" * 1001, "response": "r"}]}), 413, "items.0.prompt"),
    Bad("request-too-long", as_json({"items": [{"prompt": "p" * 900, "response": "r" * 900}] * 2}), 413, "items",
        says="3600 characters in all, the limit is 3000"),
    Bad("body-over-limit", b" " * (MAX_BODY + 1), 413, "body", says="Content-Length"),
    Bad("chunked-over-limit", chunks(MAX_BODY * 2), 413, "body", says=f"more than {MAX_BODY} bytes"),
    Bad("model-raises", as_json({"items": [{"prompt": "poison", "response": "r"}]}), 500, "items",
        says="RuntimeError: the tokenizer choked"),
    Bad("model-rejects", as_json({"items": [{"prompt": "unscorable", "response": "r"}]}), 422, "items",
        says="no expert for this input"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[BackgroundServer, Model]]:
    model = Model()
    with BackgroundServer(create_app(model, ServeConfig(**LIMITS))) as srv:
        srv.wait_ready()
        yield srv, model


def post(url: str, items: list[dict[str, str]]) -> httpx.Response:
    return httpx.post(url + "/v1/score", json={"items": items}, timeout=30)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_a_bad_request_fails_alone(server: tuple[BackgroundServer, Model], bad: Bad) -> None:
    srv, model = server
    batcher = srv.app.state.moerm.batcher
    goods = [[ok(i), ok(i + 1)] for i in range(3)]
    model.gate.clear()
    model.entered.clear()
    try:
        with ThreadPoolExecutor(5) as ex:
            blocker = ex.submit(post, srv.url, [ok(9)])
            assert model.entered.wait(10)  # the worker is busy: what follows queues up together
            sent = ex.submit(httpx.post, srv.url + bad.path, content=bad.body, headers=bad.headers, timeout=30)
            good = [ex.submit(post, srv.url, g) for g in goods]
            deadline = time.monotonic() + 10
            while batcher.queued_requests + sent.done() < 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            calls_before = len(model.calls)
            model.gate.set()
            answer, good_answers = sent.result(), [g.result() for g in good]
            assert blocker.result().status_code == 200
    finally:
        model.gate.set()
    assert answer.status_code == bad.status, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith(f"{bad.field}: ") and bad.says in detail, detail
    assert answer.json()["errors"][0]["field"] == bad.field
    for g, items in zip(good_answers, goods):
        assert g.status_code == 200, g.text
        assert g.json()["rewards"] == [want(it["prompt"], it["response"]) for it in items]
    if bad.status in (500,) or bad.id == "model-rejects":  # it reached the model, in one batch with the good ones
        assert len(model.calls[calls_before]) == 7  # then each of the four requests was scored on its own
        assert sorted(len(c) for c in model.calls[calls_before + 1:]) == [1, 2, 2, 2]


def test_the_json_parser_reports_why_a_body_is_not_json() -> None:
    from moerm.serve.app import RequestRejected, parse_json_body

    assert parse_json_body(b'{"a": [1]}') == {"a": [1]}
    for body, says in [(b"\xc3(", "not valid UTF-8 at byte 0"), (b"[" * 100_000, "nested too deeply"),
                       (b"{]", "invalid JSON at position 1")]:
        with pytest.raises(RequestRejected, match=says) as e:
            parse_json_body(body)
        assert e.value.status == 422 and e.value.problems[0][0] == "body"


# -- the body: refused by its announced size before it is read, bounded in time
def raw(srv: BackgroundServer, data: bytes, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    s.sendall(data)
    return s


def read_response(s: socket.socket) -> bytes:
    """One HTTP response (head and Content-Length body) from a raw socket, without waiting for the close."""
    out = b""
    while b"\r\n\r\n" not in out or len(out.partition(b"\r\n\r\n")[2]) < int(
            out.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0] or 0):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_a_huge_content_length_is_refused_before_the_body_arrives(server: tuple[BackgroundServer, Model]) -> None:
    srv, _ = server
    t0 = time.monotonic()
    s = raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 50000000\r\n\r\n{\"items\": [")  # 50 MB announced, 11 bytes sent
    with s:
        answer = read_response(s)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"body: Content-Length is 50000000 bytes, the limit is 262144" in answer
    assert time.monotonic() - t0 < 2


def test_a_slow_body_gets_408_and_a_slow_head_is_disconnected(server: tuple[BackgroundServer, Model]) -> None:
    srv, _ = server
    t0 = time.monotonic()
    slow_body = raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"items\"")
    slow_head = raw(srv, b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
    silent = raw(srv, b"")
    health = []
    for _ in range(5):  # the server keeps answering while they hang
        t = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        health.append(time.monotonic() - t)
        slow_head.sendall(b"X-Drip: 1\r\n")  # a byte now and then does not extend the deadline
        time.sleep(0.15)
    with slow_body, slow_head, silent:
        body_answer, head_answer, silent_answer = read_all(slow_body), read_all(slow_head), read_all(silent)
    assert body_answer.startswith(b"HTTP/1.1 408 ") and b"not the whole body (--body-timeout-s)" in body_answer
    assert head_answer == b"" and silent_answer == b""  # closed: the head did not arrive within header_timeout_s
    assert time.monotonic() - t0 < 4
    assert max(health) < 1.0
    assert 'moerm_rejected_total{reason="header_timeout"}' in httpx.get(srv.url + "/metrics").text


def test_past_max_connections_the_longest_waiting_connection_is_closed() -> None:
    model = Model()
    with BackgroundServer(create_app(model, ServeConfig(max_connections=4, header_timeout_s=30))) as srv:
        srv.wait_ready()
        idle = [raw(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n") for _ in range(4)]  # heads never finished
        time.sleep(0.2)
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            answers = [c.get("/health").status_code for _ in range(3)]  # one keep-alive connection
            scored = c.post("/v1/score", json={"items": [ok(2)]})
        closed = []
        for s in idle:
            s.settimeout(0.5)
            with s:
                closed.append(read_all(s) == b"")
        metrics = httpx.get(srv.url + "/metrics").text
    assert answers == [200, 200, 200] and scored.json()["rewards"] == [want(**ok(2))]
    assert closed[0] and sum(closed) >= 1  # the oldest made room; the newest may still be open
    assert 'moerm_rejected_total{reason="connection_evicted"}' in metrics


# -- auth
def test_the_bearer_scheme_is_case_insensitive_and_the_key_can_come_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    cfg = ServeConfig(api_key_file=str(key_file))
    assert cfg.api_key == "s3cret"
    with BackgroundServer(create_app(Model(), cfg)) as srv:
        srv.wait_ready()
        codes = {scheme: httpx.post(srv.url + "/v1/score", json={"items": [ok(1)]},
                                    headers={"Authorization": f"{scheme} s3cret"}).status_code
                 for scheme in ("Bearer", "bearer", "BEARER", "Basic")}
        wrong = httpx.post(srv.url + "/v1/score", json={"items": [ok(1)]}, headers={"Authorization": "bearer nope"})
    assert codes == {"Bearer": 200, "bearer": 200, "BEARER": 200, "Basic": 401}
    assert wrong.status_code == 401
    with pytest.raises(UserError, match="not both"):
        ServeConfig(api_key="a", api_key_file=str(key_file))
    with pytest.raises(UserError, match="cannot read the API key file"):
        ServeConfig(api_key_file=str(tmp_path / "missing"))


def test_cli_reads_the_key_file_and_warns_that_api_key_shows_in_ps(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from moerm.cli import app

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "system.json").write_text("{}")
    (tmp_path / "key").write_text("from-file\n")
    seen: dict[str, Any] = {}
    monkeypatch.setattr("moerm.serve.server.run_server", lambda source, cfg, log_level: seen.update(cfg=cfg))
    monkeypatch.delenv("MOERM_API_KEY", raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(tmp_path), "--api-key-file", str(tmp_path / "key"),
                              "--max-body-bytes", "1000", "--body-timeout-s", "2", "--header-timeout-s", "3",
                              "--max-connections", "50", "--max-request-chars", "9000", "--keep-alive-s", "20"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.api_key, cfg.max_body_bytes, cfg.body_timeout_s, cfg.header_timeout_s, cfg.max_connections,
            cfg.max_request_chars, cfg.keep_alive_s) == ("from-file", 1000, 2.0, 3.0, 50, 9000, 20.0)
    assert "warning" not in res.output
    res = runner.invoke(app, ["serve", str(tmp_path), "--api-key", "visible"])
    assert res.exit_code == 0 and seen["cfg"].api_key == "visible"
    assert "warning:" in res.output and "visible to every user of this machine (ps" in res.output


def test_once_loaded_the_model_is_out_of_the_garbage_collectors_way() -> None:
    """A full collection walking the model's objects stalls every request ~0.1 s: they are frozen after loading."""
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with BackgroundServer(create_app(Model(), ServeConfig())) as srv:
        srv.wait_ready()
        assert gc.get_freeze_count() > 0
    gc.unfreeze()
    with BackgroundServer(create_app(Model(), ServeConfig(freeze_gc=False))) as srv:
        srv.wait_ready()
        assert gc.get_freeze_count() == 0
