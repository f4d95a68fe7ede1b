"""Fault load on the reward server: good requests while bad, oversized and slow clients hammer it.

    .venv/bin/python benchmarks/serve_faults.py --seconds 10            # a tiny random model, built offline
    .venv/bin/python benchmarks/serve_faults.py --run runs/demo/baseline --seconds 30

Starts `moerm serve` in a subprocess on a free loopback port (the model: `--run`, or a tiny random BERT built and
saved offline, as the tests build theirs), waits for /health, then runs `--clients` (64) asyncio clients for
`--seconds`:

- good (half): one request after another, 1-4 pairs each from a pool, on a keep-alive connection; every reward is
  compared with offline `system.score` of the same pair in this process (within 1e-5);
- bad: a lone surrogate in one item of a 4-item request, a number for a text, invalid JSON, invalid UTF-8,
  10^5-deep JSON, a form Content-Type, a lower-case `bearer` header (accepted: no key is set);
- oversized: a 50 MB Content-Length, a chunked body past `--max-body-bytes`, too many items, too many characters;
- big bodies: `--big-body-bytes` (2 MB) of JSON under `--max-body-bytes`, so the server reads and parses all of it:
  2 MB of text in one request (refused: past --max-request-chars once parsed) and a good OpenRLHF request carrying
  2 MB of `labels` (scored: its reward is checked like a good one's);
- a 5,000-digit integer for a text (422, not an internal error);
- slow: each keeps `--slow-conns` connections open, half trickling a request head, half a request body, one byte
  every `--drip-s`, reopening whatever the server closes.

A prober in its own process opens a fresh connection for GET /health every 50 ms. Printed: good requests answered / lost
(no 200: a transport error, a timeout or another status) / wrong (a 200 whose rewards differ from offline), p50 /
p99 latency of the answered good ones, /health p50 / p99 while the faults arrive, what the bad / oversized / slow
clients got, the server's rejection counters from /metrics, and the load average (os.getloadavg()) before and after.
Targets: 0 good requests lost or wrong, /health p99 under 100 ms. The run is bounded: `--seconds` of load plus the
start-up (`--start-timeout`, 120 s at most) and a 10 s drain. `--json PATH` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = ["good", "great", "helpful", "correct", "clear", "kind", "bad", "awful", "wrong", "rude", "useless",
         "unclear", "the", "a", "answer", "question", "about", "topic", "please", "explain", "tell", "me", "how",
         "why", "what", "is", "it", "this", "that", "and", "of", "to", "in", "reply", "yes", "no", "maybe"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(root: Path) -> Path:
    """A 2-layer, 32-wide random BERT baseline (MiniLM's tokenizer, embedded), saved as a run folder."""
    import torch
    from transformers import BertConfig, BertModel

    from moerm.config import ModelConfig, RunConfig
    from moerm.encoding import load_tokenizer
    from moerm.systems import build_system

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(root / "backbone", safe_serialization=True)
    load_tokenizer("minilm").save_pretrained(root / "backbone")
    system = build_system(RunConfig(system="baseline", model=ModelConfig(backbone=str(root / "backbone"),
                                                                         max_length=48)))
    system.save(root / "run" / "model")
    return root / "run"


def pool(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))), " ".join(rng.choices(WORDS, k=rng.randint(2, 20))))
            for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


class Tally:
    def __init__(self) -> None:
        self.good_answered = 0
        self.good_lost = 0
        self.good_wrong = 0
        self.good_latency: list[float] = []
        self.health_latency: list[float] = []
        self.health_failed = 0
        self.lost_samples: list[str] = []
        self.outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)


async def good_client(url: str, items: list[tuple[str, str]], offline: list[float], stop: float, tally: Tally,
                      seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() < stop:
            idx = [rng.randrange(len(items)) for _ in range(rng.randint(1, 4))]
            body = {"items": [{"prompt": items[i][0], "response": items[i][1]} for i in idx]}
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/score", json=body)
            except httpx.HTTPError as e:
                tally.good_lost += 1
                tally.lost_samples.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                tally.good_lost += 1
                tally.lost_samples.append(f"{r.status_code}: {r.text[:200]}")
                continue
            got = r.json()["rewards"]
            if len(got) != len(idx) or any(g is None or abs(g - offline[i]) > 1e-5 for g, i in zip(got, idx)):
                tally.good_wrong += 1
            else:
                tally.good_answered += 1
                tally.good_latency.append(dt)


SURROGATE_QUERY = "<|im_start|>user\nq\udfff<|im_end|>\n<|im_start|>assistant\na"


def bad_requests() -> list[tuple[str, bytes, dict[str, str], str]]:
    """(name, body, headers, path) of requests that must be refused with 4xx (or, for lower-case bearer, pass)."""
    ok = {"prompt": "what is it", "response": "a good answer"}
    js = {"Content-Type": "application/json"}
    return [
        ("surrogate", json.dumps({"items": [ok, ok, ok, {"prompt": "p", "response": "x\ud800y"}]}).encode(), js,
         "/v1/score"),
        ("wrong_type", json.dumps({"items": [ok, {"prompt": "p", "response": 5}]}).encode(), js, "/v1/score"),
        ("invalid_json", b'{"items": [', js, "/v1/score"),
        ("invalid_utf8", b'{"items": [{"prompt": "\xff", "response": "r"}]}', js, "/v1/score"),
        ("deep_json", b"[" * 100_000 + b"]" * 100_000, js, "/v1/score"),
        ("form_type", b"prompt=p&response=r", {"Content-Type": "application/x-www-form-urlencoded"}, "/v1/score"),
        ("lowercase_bearer", json.dumps({"items": [ok]}).encode(), {**js, "Authorization": "bearer anything"},
         "/v1/score"),
        ("get_reward_surrogate", json.dumps({"query": [SURROGATE_QUERY]}).encode(), js, "/get_reward"),
        ("integer_5000_digits", b'{"items": [{"prompt": "p", "response": ' + b"7" * 5000 + b"}]}", js, "/v1/score"),
    ]


async def bad_client(url: str, stop: float, tally: Tally, seed: int) -> None:
    reqs = bad_requests()
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() < stop:
            name, body, headers, path = rng.choice(reqs)
            try:
                r = await c.post(path, content=body, headers=headers)
                tally.outcomes["bad"][f"{name}:{r.status_code}"] += 1
            except httpx.HTTPError as e:
                tally.outcomes["bad"][f"{name}:{type(e).__name__}"] += 1
            await asyncio.sleep(0.01)


async def read_status(reader: asyncio.StreamReader, timeout: float) -> str:
    line = await asyncio.wait_for(reader.readline(), timeout)
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"


CHATML_QUERY = "<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>"


def big_bodies(size: int, item: tuple[str, str]) -> dict[str, bytes]:
    """Bodies of about `size` bytes that the server must read and parse whole: one refused once parsed (too many
    characters), one good (an OpenRLHF request whose `labels` are most of it; its reward is `item`'s)."""
    n = size // 20_000 + 1  # just past the server's default --max-request-chars (2,000,000)
    text = {"items": [{"prompt": "p" * 10_000, "response": "r" * 10_000} for _ in range(n)]}
    labels = {"query": [CHATML_QUERY.format(p=item[0], r=item[1])], "labels": [[0.5] * 8] * max(1, size // 42)}
    return {"big_text": json.dumps(text).encode(), "big_labels": json.dumps(labels).encode()}


async def oversized_client(host: str, port: int, url: str, stop: float, tally: Tally, seed: int,
                           max_body: int, big: dict[str, bytes] | None = None, big_reward: float = 0.0) -> None:
    rng = random.Random(seed)
    out = tally.outcomes["oversized"]
    kinds = ["content_length_50MB", "chunked_over_limit", "too_many_items", "too_many_chars"] + list(big or {})
    js = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() < stop:
            kind = rng.choice(kinds)
            try:
                if big and kind == "big_text":
                    r = await c.post("/v1/score", content=big[kind], headers=js)
                    out[f"{kind}_{len(big[kind]) // 1000}KB:{r.status_code}"] += 1
                elif big and kind == "big_labels":  # a good request: its reward must be right
                    r = await c.post("/get_reward", content=big[kind], headers=js)
                    right = r.status_code == 200 and abs(r.json()["rewards"][0] - big_reward) <= 1e-5
                    out[f"{kind}_{len(big[kind]) // 1000}KB:{r.status_code}{'' if right else ':WRONG'}"] += 1
                    if right:
                        tally.good_answered += 1
                    elif r.status_code == 200:
                        tally.good_wrong += 1
                    else:
                        tally.good_lost += 1
                        tally.lost_samples.append(f"{kind} {r.status_code}: {r.text[:200]}")
                elif kind == "content_length_50MB":
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 50000000\r\n\r\n{\"items\": [")
                    await writer.drain()
                    out[f"{kind}:{await read_status(reader, 10)}"] += 1
                    writer.close()
                elif kind == "chunked_over_limit":
                    reader, writer = await asyncio.open_connection(host, port)
                    writer.write(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
                    sent = 0
                    while sent <= max_body + 65536:
                        writer.write(chunk)
                        await writer.drain()
                        sent += 65536
                    out[f"{kind}:{await read_status(reader, 10)}"] += 1
                    writer.close()
                elif kind == "too_many_items":
                    r = await c.post("/v1/score", json={"items": [{"prompt": "p", "response": "r"}] * 5000})
                    out[f"{kind}:{r.status_code}"] += 1
                else:
                    r = await c.post("/v1/score", json={"items": [{"prompt": "p" * 30000, "response": "r" * 30000}]
                                                        * 40})
                    out[f"{kind}:{r.status_code}"] += 1
            except (TimeoutError, OSError, httpx.HTTPError) as e:
                out[f"{kind}:{type(e).__name__}"] += 1
            await asyncio.sleep(0.05)


async def slow_connection(host: str, port: int, stop: float, tally: Tally, body: bool, drip: float) -> None:
    out = tally.outcomes["slow_body" if body else "slow_header"]
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            out[f"connect:{type(e).__name__}"] += 1
            await asyncio.sleep(0.2)
            continue
        out["opened"] += 1
        head = b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        writer.write(head)
        t0 = time.monotonic()
        try:
            while time.monotonic() < stop:
                await writer.drain()
                try:
                    line = await asyncio.wait_for(reader.readline(), drip)
                except TimeoutError:
                    writer.write(b" " if body else b"X")  # one more byte
                    continue
                status = line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"
                out[f"{status} after {min(int(time.monotonic() - t0), 99)} s"] += 1
                break
        except (TimeoutError, OSError) as e:
            out[f"{type(e).__name__} after {min(int(time.monotonic() - t0), 99)} s"] += 1
        writer.close()


def health_prober(port: int, seconds: float, conn: Any) -> None:
    """In its own process (so the clients' event loop does not delay it): GET /health on a fresh connection every
    50 ms for `seconds`; sends back (latencies of the 200s, failures)."""
    latencies: list[float] = []
    failed = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1.1 200"):
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1
        except OSError:
            failed += 1
        time.sleep(0.05)
    conn.send((latencies, failed))
    conn.close()


async def load(args: argparse.Namespace, url: str, port: int, items: list[tuple[str, str]],
               offline: list[float]) -> Tally:
    big = big_bodies(args.big_body_bytes, items[0]) if args.big_body_bytes > 0 else None
    tally = Tally()
    stop = time.monotonic() + args.seconds
    n = args.clients
    n_good, n_over, n_slow = n // 2, n // 8, n // 8
    n_bad = n - n_good - n_over - n_slow  # 64 clients: 32 good, 16 bad, 8 oversized, 8 slow
    tasks = [good_client(url, items, offline, stop, tally, seed=i) for i in range(n_good)]
    tasks += [bad_client(url, stop, tally, seed=100 + i) for i in range(n_bad)]
    tasks += [oversized_client("127.0.0.1", port, url, stop, tally, 200 + i, args.max_body_bytes, big, offline[0])
              for i in range(n_over)]
    for i in range(n_slow):
        tasks += [slow_connection("127.0.0.1", port, stop, tally, body=j % 2 == 1, drip=args.drip_s)
                  for j in range(args.slow_conns)]
    tally.outcomes["clients"].update({"good": n_good, "bad": n_bad, "oversized": n_over, "slow": n_slow,
                                      "slow connections": n_slow * args.slow_conns})
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe(duplex=False)
    prober = ctx.Process(target=health_prober, args=(port, args.seconds, theirs), daemon=True)
    prober.start()
    coros = [asyncio.ensure_future(t) for t in tasks]
    done, pending = await asyncio.wait(coros, timeout=args.seconds + 10)  # bounded: a 10 s drain at most
    if await asyncio.to_thread(mine.poll, 15):
        tally.health_latency, tally.health_failed = mine.recv()
    prober.join(5)
    if prober.is_alive():
        prober.kill()
    for p in pending:
        p.cancel()
    for d in done:
        if d.exception() is not None:
            tally.outcomes["client errors"][repr(d.exception())[:120]] += 1
    return tally


def rejected_counters(url: str) -> dict[str, int]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("moerm_rejected_total{"):
            name, value = line.rsplit(" ", 1)
            out[name.split('"')[1]] = int(float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a saved run or model folder (default: a tiny random model built offline)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--slow-conns", type=int, default=16, help="connections each slow client keeps open")
    ap.add_argument("--drip-s", type=float, default=0.5, help="seconds between a slow client's bytes")
    ap.add_argument("--header-timeout-s", type=float, default=2.0)
    ap.add_argument("--body-timeout-s", type=float, default=2.0)
    ap.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--big-body-bytes", type=int, default=2_000_000,
                    help="size of the big bodies the oversized clients mix in (0: none)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--max-connections", type=int, default=1000)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--start-timeout", type=float, default=120.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from moerm.systems import load_system

    tmp = tempfile.TemporaryDirectory(prefix="moerm-faults-")
    run = args.run or str(tiny_model(Path(tmp.name)))
    items = pool(64)
    system = load_system(run)
    offline = [float(r) for r in system.score([p for p, _ in items], [r for _, r in items]).rewards]
    gc.collect()
    gc.freeze()  # as the server does: torch's objects out of the collector's way, so clients are not stalled

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moerm.cli", "serve", run, "--port", str(port), "--log-level", "warning",
           "--torch-threads", str(args.torch_threads), "--header-timeout-s", str(args.header_timeout_s),
           "--body-timeout-s", str(args.body_timeout_s), "--max-body-bytes", str(args.max_body_bytes),
           "--max-connections", str(args.max_connections)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOERM_API_KEY", None)
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + min(args.start_timeout, 120.0)
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not become ready (exit code {server.poll()})")
            time.sleep(0.2)
        load_before = os.getloadavg()
        t0 = time.monotonic()
        tally = asyncio.run(load(args, url, port, items, offline))
        elapsed = time.monotonic() - t0
        load_after = os.getloadavg()
        rejected = rejected_counters(url)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()

    good_total = tally.good_answered + tally.good_lost + tally.good_wrong
    print(f"serve_faults: {args.clients} clients for {args.seconds:g} s ({elapsed:.1f} s with the drain), "
          f"model {'--run ' + args.run if args.run else 'tiny random BERT (built offline)'}")
    print(f"clients: {dict(tally.outcomes.pop('clients'))}")
    print(f"good requests: {good_total} sent, {tally.good_answered} answered, {tally.good_lost} lost, "
          f"{tally.good_wrong} wrong (vs offline system.score, 1e-5)")
    gl = tally.good_latency
    print(f"good latency: p50 {1000 * pct(gl, 0.5):.1f} ms, p99 {1000 * pct(gl, 0.99):.1f} ms")
    hl = tally.health_latency
    print(f"/health while faults arrive: {len(hl)} probes ok, {tally.health_failed} failed, p50 "
          f"{1000 * pct(hl, 0.5):.1f} ms, p99 {1000 * pct(hl, 0.99):.1f} ms, max {1000 * max(hl, default=0):.1f} ms")
    for kind, counter in sorted(tally.outcomes.items()):
        print(f"{kind}: {dict(sorted(counter.items()))}")
    print(f"server rejections (/metrics): {rejected}")
    print(f"load average (1, 5, 15 min): before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")
    if tally.lost_samples:
        print(f"lost samples: {tally.lost_samples[:5]}")
    ok = tally.good_lost == 0 and tally.good_wrong == 0 and pct(hl, 0.99) < 0.1
    print(f"targets (0 lost, 0 wrong, /health p99 < 100 ms): {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "good_sent": good_total, "good_answered": tally.good_answered, "good_lost": tally.good_lost,
            "good_wrong": tally.good_wrong, "health_ok": len(hl), "health_failed": tally.health_failed,
            "health_p50_ms": 1000 * pct(hl, 0.5), "health_p99_ms": 1000 * pct(hl, 0.99),
            "outcomes": {k: dict(v) for k, v in tally.outcomes.items()}, "rejected": rejected,
            "lost_samples": tally.lost_samples[:5], "targets_met": ok}, indent=2))


if __name__ == "__main__":
    main()
