"""The server's limits on what a body may hold and what parsing it may cost (reliability issue: numbers past
Python's digit limit, large bodies parsed on the event loop, the fault load with 2 MB bodies in the mix)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import moerm.serve.app as app_module
from moerm.serve import BackgroundServer, ServeConfig, create_app
from test_server import Model, want

ROOT = Path(__file__).resolve().parents[2]
CHATML = "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[BackgroundServer, Model]]:
    model = Model()
    with BackgroundServer(create_app(model, ServeConfig(max_body_bytes=8 * 1024 * 1024))) as srv:
        srv.wait_ready()
        yield srv, model


@pytest.mark.parametrize("path,template", [
    ("/v1/score", '{"items": [{"prompt": "p", "response": %s}]}'),
    ("/v1/score", '{"items": [{"prompt": "p", "response": "r", "domain": %s}]}'),
    ("/get_reward", '{"query": ["q"], "labels": [%s]}'),
    ("/classify", '{"input": "q", "truncate_prompt_tokens": %s}'),
])
def test_an_integer_of_5000_digits_is_a_json_422_not_an_internal_error(server: tuple[BackgroundServer, Model],
                                                                        path: str, template: str) -> None:
    srv, _ = server
    r = httpx.post(srv.url + path, content=(template % ("9" * 5000)).encode(),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["errors"][0]["field"] == "body" and "4300 digits" in body["detail"]
    # 400 digits parse (Python's limit is 4300): a wrong type is named as usual, a label is ignored
    small = httpx.post(srv.url + path, content=(template % ("9" * 400)).encode(),
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert small.status_code in (200, 422) and small.headers["content-type"] == "application/json"


def test_a_large_body_is_parsed_off_the_event_loop(server: tuple[BackgroundServer, Model],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """While a 2 MB body is being parsed (held here until /health has answered), /health still answers: the parse
    runs in a worker thread, not on the event loop that serves every other request."""
    srv, _ = server
    parsing, health_answered = threading.Event(), threading.Event()
    real = app_module.parse_json_body

    def slow_parse(body: bytes) -> Any:
        if len(body) > 1_000_000:
            parsing.set()
            health_answered.wait(10)  # on the event loop this would hold every request for 10 s
        return real(body)

    monkeypatch.setattr(app_module, "parse_json_body", slow_parse)
    items = [{"prompt": "p" * 1000, "response": "r" * 20}] * 20
    body = json.dumps({"query": [CHATML.format(p="what", r="this")], "labels": ["x" * 100] * 20_000,
                       "unused": items}).encode()
    assert len(body) > 2_000_000
    result: dict[str, httpx.Response] = {}
    poster = threading.Thread(target=lambda: result.update(r=httpx.post(
        srv.url + "/get_reward", content=body, headers={"Content-Type": "application/json"}, timeout=60)))
    poster.start()
    try:
        assert parsing.wait(30)
        t0 = time.monotonic()
        health = httpx.get(srv.url + "/health", timeout=5)
        waited = time.monotonic() - t0
        assert health.status_code == 200 and waited < 5
    finally:
        health_answered.set()
        poster.join(60)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["rewards"] == [want("what", "this")]


def test_serve_faults_with_2mb_bodies_loses_nothing_and_scores_nothing_wrong(tmp_path: Path) -> None:
    """The fault benchmark at a small size: good requests (and a good 2 MB one) all answered right, the 2 MB
    bodies parsed and answered, the 5,000-digit integer refused with 422."""
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_faults.py"), "--seconds", "4",
                           "--clients", "16", "--slow-conns", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["good_lost"] == 0 and res["good_wrong"] == 0, res
    assert res["good_answered"] > 0 and res["health_failed"] == 0 and res["health_ok"] > 0
    over = res["outcomes"]["oversized"]
    assert all(k.endswith((":413", ":200")) for k in over if k.startswith(("big_text", "big_labels"))), over
    assert all(not k.endswith(":WRONG") for k in over), over
    # the oversized clients' seeded picks reach a good 2 MB request within their first three
    assert any(k.startswith("big_labels_") and k.endswith(":200") for k in over), over
    bad = res["outcomes"]["bad"]
    assert all(k == "integer_5000_digits:422" for k in bad if k.startswith("integer_5000_digits")), bad
