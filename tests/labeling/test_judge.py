"""The LLM-judge labeller against a scripted chat-completions server on 127.0.0.1 (no network beyond loopback)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from moerm.cli.label import label_app
from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.labeling.judge import JudgeConfig, JudgeConfigError, judge_pairs, parse_verdict

KEY = "sk-test-secret"
# policy(reply in slot A, reply in slot B, how often this exact order was asked before) -> answer text or HTTP status
Policy = Callable[[str, str, int], "str | int"]


class ScriptedServer(ThreadingHTTPServer):
    """Speaks POST /v1/chat/completions; finds which known reply sits in slot A and B by its position in the text."""

    daemon_threads = True

    def __init__(self, replies: list[str], policy: Policy, delay: float = 0.0, hold_until: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies, self.policy, self.delay = replies, policy, delay
        # hold_until=N: the first requests wait (up to 10 s) until N are in flight at once, so a client that allows
        # N parallel requests is seen doing so however slowly its threads start on a loaded machine
        self.hold_until = hold_until
        self.all_in = threading.Event()
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str]] = []  # (A, B) per request, retries included
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.inflight = self.max_inflight = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out closes its socket; the late write's BrokenPipe is expected, not news

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        a, b = sorted((r for r in srv.replies if r in text), key=text.index)
        with srv.lock:
            n = srv.seen.count((a, b))
            srv.seen.append((a, b))
            srv.bodies.append(body)
            srv.auth.append(self.headers.get("Authorization"))
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            if srv.hold_until is not None and srv.inflight >= srv.hold_until:
                srv.all_in.set()
        try:
            if srv.hold_until is not None:
                srv.all_in.wait(timeout=10)
            time.sleep(srv.delay)
            answer = srv.policy(a, b, n)
        finally:
            # Out of flight BEFORE the reply leaves: once the client has the reply it may send its next request at
            # once, and that request must not find this finished one still counted (it did, on a loaded machine).
            with srv.lock:
                srv.inflight -= 1
        if isinstance(answer, int):
            self._send(answer, {"error": {"message": "scripted failure"}})
        else:
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve(replies: list[str], policy: Policy, delay: float = 0.0,
          hold_until: int | None = None) -> Iterator[ScriptedServer]:
    srv = ScriptedServer(replies, policy, delay, hold_until)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def by_score(scores: dict[str, float]) -> Policy:
    """A consistent judge: the reply with the higher score wins, whatever its slot."""
    return lambda a, b, n: "Reasoning...\nAnswer: A" if scores[a] > scores[b] else "Answer: **B**"


def make_pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(id=f"p{i}", domain="chat", prompt=f"question {i}", chosen=f"<chosen {i}>",
                           rejected=f"<rejected {i}>", margin=1.0) for i in range(n)]


def replies_of(pairs: list[PreferencePair]) -> list[str]:
    return [r for p in pairs for r in (p.chosen, p.rejected)]


def config(srv: ScriptedServer, **kw: Any) -> JudgeConfig:
    return JudgeConfig(base_url=srv.base_url, model="judge-1", api_key=KEY, backoff=0.01, timeout=5, **kw)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would otherwise see our loopback requests.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _clear_judge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MOERM_JUDGE_BASE_URL", "MOERM_JUDGE_MODEL", "MOERM_JUDGE_API_KEY", "OPENAI_BASE_URL",
                "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("text", "verdict"), [
    ("A", "A"), ("b", None), ("Answer: B.", "B"), ("Some thoughts.\n**Final answer:** (A)\n", "A"),
    ("Answer: A\nOn reflection...\nAnswer: B", "B"), ("The better reply is B", "B"), ("I cannot decide", None),
    ("Answer: a tie", None), ("A or B", None), ("", None),
])
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


def test_both_orders_asked_and_agreement_kept_with_orientation() -> None:
    pairs = make_pairs(2)
    # p0: the judge prefers `chosen`; p1: it prefers `rejected`, so that label flips.
    scores = {"<chosen 0>": 1, "<rejected 0>": 0, "<chosen 1>": 0, "<rejected 1>": 1}
    with serve(replies_of(pairs), by_score(scores)) as srv:
        kept, report = judge_pairs(pairs, ["coherence"], config(srv))
    for p in pairs:
        assert Counter(srv.seen)[(p.chosen, p.rejected)] == 1 and Counter(srv.seen)[(p.rejected, p.chosen)] == 1
    assert all(a == f"Bearer {KEY}" for a in srv.auth)
    body = srv.bodies[0]
    assert (body["model"], body["temperature"]) == ("judge-1", 0) and "coherence" in body["messages"][-1]["content"]
    assert [(p.id, p.subset, p.chosen, p.rejected, p.margin) for p in kept] == [
        ("p0:coherence", "coherence", "<chosen 0>", "<rejected 0>", None),
        ("p1:coherence", "coherence", "<rejected 1>", "<chosen 1>", None),
    ]
    assert report == {"judged": 2, "kept": 2, "flipped": 1, "disagreements": 0, "malformed": 0, "failed": 0,
                      "asked": 4, "cached": 0, "attempts": 4}


def test_disagreement_and_malformed_are_dropped_and_counted() -> None:
    pairs = make_pairs(3)

    def policy(a: str, b: str, n: int) -> str:
        if "1" in a:
            return "Answer: A"  # pure position bias: A in both orders
        if "2" in a:
            return "I cannot decide"
        return "Answer: A" if a.startswith("<chosen") else "Answer: B"

    with serve(replies_of(pairs), policy) as srv:
        kept, report = judge_pairs(pairs, ["coherence", "helpfulness"], config(srv))
    assert [p.id for p in kept] == ["p0:coherence", "p0:helpfulness"]
    assert (report["judged"], report["kept"], report["disagreements"], report["malformed"]) == (6, 2, 2, 2)
    assert len(srv.seen) == 12


def test_retry_after_500_then_success() -> None:
    pairs = make_pairs(1)
    scores = {"<chosen 0>": 1, "<rejected 0>": 0}
    good = by_score(scores)
    with serve(replies_of(pairs), lambda a, b, n: 500 if n == 0 and a == "<chosen 0>" else good(a, b, n)) as srv:
        kept, report = judge_pairs(pairs, ["coherence"], config(srv, max_retries=2))
    assert len(srv.seen) == 3  # two questions, one of them asked twice
    assert [p.id for p in kept] == ["p0:coherence"]
    assert (report["asked"], report["attempts"], report["failed"]) == (2, 3, 0)


def test_timeout_is_retried() -> None:
    pairs = make_pairs(1)
    with serve(replies_of(pairs), by_score({"<chosen 0>": 1, "<rejected 0>": 0}), delay=0.3) as srv:
        cfg = JudgeConfig(base_url=srv.base_url, model="m", timeout=0.1, max_retries=1, backoff=0.01)
        kept, report = judge_pairs(pairs, ["coherence"], cfg)
    # Every attempt times out (the server is slower than the timeout): both questions fail after one retry.
    assert kept == [] and (report["failed"], report["attempts"]) == (1, 4)


def test_exhausted_retries_fail_one_pair_and_the_run_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    pairs = make_pairs(2)
    scores = {"<chosen 0>": 1, "<rejected 0>": 0, "<chosen 1>": 1, "<rejected 1>": 0}
    good = by_score(scores)
    with caplog.at_level(logging.WARNING), serve(replies_of(pairs),
                                                  lambda a, b, n: 503 if "1" in a else good(a, b, n)) as srv:
        kept, report = judge_pairs(pairs, ["coherence"], config(srv, max_retries=2))
    assert [p.id for p in kept] == ["p0:coherence"]
    assert (report["failed"], report["kept"], report["attempts"]) == (1, 1, 2 + 2 * 3)
    assert "p1 / coherence" in caplog.text and "HTTP 503" in caplog.text and KEY not in caplog.text


def test_connection_refused_counts_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff=0.01)
    with caplog.at_level(logging.WARNING):
        kept, report = judge_pairs(make_pairs(1), ["coherence"], cfg)
    assert kept == [] and (report["failed"], report["attempts"]) == (1, 4)
    assert "no answer after 2 attempts" in caplog.text


def test_unauthorized_stops_the_run() -> None:
    pairs = make_pairs(3)
    with serve(replies_of(pairs), lambda a, b, n: 401) as srv, pytest.raises(JudgeConfigError, match="401"):
        judge_pairs(pairs, ["coherence"], config(srv, concurrency=1))
    assert len(srv.seen) <= 2  # queued questions are dropped, not sent


def test_cache_resume_and_truncated_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = make_pairs(3)
    policy = by_score({r: float(r.startswith("<chosen")) for r in replies_of(pairs)})
    cache = tmp_path / "cache.jsonl"
    with serve(replies_of(pairs), policy) as srv:
        first, r1 = judge_pairs(pairs, ["coherence"], config(srv), cache_path=cache)
    assert len(srv.seen) == 6 and r1["asked"] == 6 and len(cache.read_text().splitlines()) == 6

    with serve(replies_of(pairs), policy) as srv:
        second, r2 = judge_pairs(pairs, ["coherence"], config(srv), cache_path=cache)
    assert srv.seen == [] and second == first and (r2["asked"], r2["cached"], r2["kept"]) == (0, 6, 3)

    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) - 20])  # killed mid-write: the last line is cut short, no newline
    with caplog.at_level(logging.WARNING), serve(replies_of(pairs), policy) as srv:
        third, r3 = judge_pairs(pairs, ["coherence"], config(srv), cache_path=cache)
    assert "ignoring unreadable cache last line" in caplog.text
    assert len(srv.seen) == 1 and third == first and (r3["asked"], r3["cached"]) == (1, 5)
    # The re-asked answer starts on its own line, so a fourth run reads everything back.
    with serve(replies_of(pairs), policy) as srv:
        judge_pairs(pairs, ["coherence"], config(srv), cache_path=cache)
    assert srv.seen == []


def test_concurrency_bound_is_respected() -> None:
    pairs = make_pairs(6)
    policy = by_score({r: float(r.startswith("<chosen")) for r in replies_of(pairs)})
    with serve(replies_of(pairs), policy, delay=0.05, hold_until=3) as srv:
        kept, _ = judge_pairs(pairs, ["coherence"], config(srv, concurrency=3))
    assert len(kept) == 6 and len(srv.seen) == 12
    assert srv.max_inflight == 3  # parallel, but never more than the bound


def test_config_from_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_judge_env(monkeypatch)
    with pytest.raises(JudgeConfigError, match="base URL"):
        JudgeConfig.resolve(model="m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    with pytest.raises(JudgeConfigError, match="model"):
        JudgeConfig.resolve()
    monkeypatch.setenv("MOERM_JUDGE_MODEL", "env-model")
    cfg = JudgeConfig.resolve()
    assert (cfg.base_url, cfg.model, cfg.api_key) == ("http://127.0.0.1:1/v1", "env-model", "sk-openai")
    monkeypatch.setenv("MOERM_JUDGE_API_KEY", "sk-moerm")
    assert JudgeConfig.resolve().api_key == "sk-moerm"
    cfg = JudgeConfig.resolve(base_url="http://127.0.0.1:2", model="opt", api_key="sk-opt")
    assert (cfg.base_url, cfg.model, cfg.api_key) == ("http://127.0.0.1:2", "opt", "sk-opt")
    assert "sk-opt" not in repr(cfg)


def test_cli_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_judge_env(monkeypatch)
    pairs = make_pairs(2)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    runner = CliRunner()

    result = runner.invoke(label_app, ["judge", str(src), "--capability", "coherence", "--out", str(out)])
    assert result.exit_code == 1 and "no judge base URL" in result.output

    policy = by_score({"<chosen 0>": 1, "<rejected 0>": 0, "<chosen 1>": 0, "<rejected 1>": 1})
    with serve(replies_of(pairs), policy) as srv:
        monkeypatch.setenv("MOERM_JUDGE_BASE_URL", srv.base_url)
        monkeypatch.setenv("MOERM_JUDGE_API_KEY", KEY)
        args = ["judge", str(src), "--capability", "coherence", "--capability", "safety", "--out", str(out),
                "--model", "judge-1", "--concurrency", "2"]
        result = runner.invoke(label_app, args)
        assert result.exit_code == 0, result.output
        assert "kept 4 of 4 judgements (2 flipped" in result.output and KEY not in result.output
        assert (tmp_path / "out.jsonl.judge-cache.jsonl").exists()
        written, _ = load_pairs([out])
        assert [p.id for p in written] == ["p0:coherence", "p0:safety", "p1:coherence", "p1:safety"]

        result = runner.invoke(label_app, args)  # resumed entirely from the default cache
        assert result.exit_code == 0 and "0 asked" in result.output and "8 from cache" in result.output
        assert len(srv.seen) == 8

    result = runner.invoke(label_app, ["judge", str(tmp_path / "missing.jsonl"), "--capability", "c",
                                       "--out", str(out), "--model", "m"])
    assert result.exit_code == 1 and "no such file" in result.output


def test_cli_judge_takes_capabilities_and_descriptions_from_a_tasks_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_judge_env(monkeypatch)
    pairs = make_pairs(1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs), encoding="utf-8")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("tasks:\n  chat:\n    domains: [d]\n    capabilities:\n      empathy: responds to the user's feelings\n"
                     "      proactivity: moves the talk forward\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    policy = by_score({"<chosen 0>": 1, "<rejected 0>": 0})
    with serve(replies_of(pairs), policy) as srv:
        monkeypatch.setenv("MOERM_JUDGE_BASE_URL", srv.base_url)
        result = CliRunner().invoke(label_app, ["judge", str(src), "--tasks-file", str(tasks), "--task", "chat",
                                                "--out", str(out), "--model", "m"])
        assert result.exit_code == 0, result.output
        assert "kept 2 of 2 judgements" in result.output
        asked = json.dumps(srv.bodies)
        assert "empathy (responds to the user's feelings)" in asked and "proactivity (moves the talk forward)" in asked
    result = CliRunner().invoke(label_app, ["judge", str(src), "--tasks-file", str(tasks), "--task", "nope",
                                            "--out", str(out), "--model", "m"])
    assert result.exit_code == 1 and "--task must name a task" in result.output
