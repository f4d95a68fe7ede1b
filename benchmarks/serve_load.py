"""Load test of the reward server against offline scoring: N concurrent clients for a bounded time, dynamic
batching on and off, and `system.score` on the same pairs, batch size and threads in this process.

    .venv/bin/python benchmarks/serve_load.py runs/demo/baseline --data examples/data --clients 32 --seconds 15
    .venv/bin/python benchmarks/serve_load.py RUN --clients 32 --seconds 10 --torch-threads 1 --settings on

For each setting the script starts `moerm serve RUN` in a subprocess on a free loopback port, waits for /health,
warms it up, then runs `--clients` asyncio clients (httpx) that each send one request after another for
`--seconds`, cycling through held-out pairs of `--data` (chosen replies, `--items-per-request` pairs per request).
It reports requests/s and pairs/s (answered within the window), p50/p99 latency (of every answered request),
errors (non-200 or transport failures), lost requests (sent but never answered), and the server's mean batch size
(from /metrics). Settings (`--settings`): batching on and off at `--clients`, then batching on at
`--stress-clients` (64) for the errors / lost-requests check (`--only-stress N` runs just that one, N times).

Offline: right before and right after each server setting (no server running then), this process times
`system.score` of the same inputs in one call with the server's `--batch-size` and `--torch-threads`, repeated for
`--offline-seconds`; the setting is compared with the mean of the two. The machine is shared with whatever else
runs on it, so the load average (`os.getloadavg`) is reported beside each figure, and CPU time per pair of the
server process (all its threads, from /proc) and of the offline timing: equal CPU per pair with fewer pairs/s
means the server was given less CPU, not that it wasted any; "model busy" is the share of the load's wall time
the server spent inside scoring calls (from /metrics). Every reward returned is compared with offline
`system.score` of the same pair (the largest difference is reported). `--torch-threads 1` gives server and offline
one torch thread (see docs/SERVING.md, "CPU servers").
Targets: batching on >= 3x the pairs/s of batching off at 32 clients, zero errors and zero lost requests at 64
clients, served scores equal offline scores (issue 6); at 32 clients of 1 pair each the server's pairs/s at least
0.9x offline, p99 at most 2x p50 (issue 15).

Forward batch sizes (`--batch-sizes 4,8,32,64`): the "on" setting once per size b, the server with `--batch-size b`
and token-budget batching (`--max-batch-tokens`: b x the inputs' median token count with `--budget auto`, the
default; a number; or `none` for passes of b rows), compared with offline `system.score` at batch size b; target
(issue 27): at least 0.9x offline at every size, p99 at most 2x p50.

    .venv/bin/python benchmarks/serve_load.py RUN --clients 32 --settings on --batch-sizes 4,8,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx


@dataclass
class Setting:
    name: str
    batching: bool
    clients: int


@dataclass
class Result:
    setting: str
    batching: bool
    clients: int
    seconds: float
    requests: int
    pairs: int
    requests_per_s: float
    pairs_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    lost: int
    mean_batch_items: float
    max_abs_diff_vs_offline: float
    offline_pairs_per_s: float = float("nan")  # mean of the offline timings right before and right after
    offline_before_after: tuple[float, float] = (float("nan"), float("nan"))
    vs_offline: float = float("nan")  # pairs_per_s / offline_pairs_per_s
    server_cpu_ms_per_pair: float = float("nan")  # the server process's CPU time (all threads) per pair scored
    server_loop_cpu_ms_per_pair: float = float("nan")  # of which its main thread's: event loop, HTTP, JSON, checks
    offline_cpu_ms_per_pair: float = float("nan")  # this process's CPU time per pair in the offline timings
    server_cpu_share: float = float("nan")  # server CPU seconds / wall seconds during the load (1.0 = one core)
    model_busy: float = float("nan")  # fraction of the load's wall time the server spent inside scoring calls
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() before the first offline timing
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)  # and after the second
    error_samples: list[str] = field(default_factory=list)


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process `pid`, all its threads, or of its thread `thread` (Linux /proc; NaN
    elsewhere)."""
    try:
        stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def offline_timing(system: object, inputs: list[tuple[str, str]], args: argparse.Namespace) -> tuple[float, float]:
    """Offline (pairs/s, CPU ms per pair): `system.score` of all `inputs` in one call at the server's `--batch-size`
    (as `moerm score` would), repeated for at least `--offline-seconds` after one warm-up call."""
    prompts, responses = [p for p, _ in inputs], [r for _, r in inputs]
    score = system.score  # type: ignore[attr-defined]
    score(prompts[:4], responses[:4], batch_size=args.batch_size)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - t0 < args.offline_seconds:
        score(prompts, responses, batch_size=args.batch_size)
        n += len(inputs)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n


def start_py_spy(pid: int, setting: Setting, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy sampling every thread of the server (idle ones too) for the load window, without pausing it."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args.py_spy.mkdir(parents=True, exist_ok=True)
    out = args.py_spy / f"{setting.name.replace(', ', '-').replace(' ', '_')}.txt"
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(args.seconds))), "--rate", "100",
           "--threads", "--idle", "--nonblocking", "--format", "raw", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


# A sampled stack ending in one of these is a thread waiting (the event loop in select, a worker for work).
IDLE_LEAVES = (".select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py")


def print_profile(path: Path) -> None:
    """Each server thread's share of the samples (wall time, on CPU or not): busy, split into tokenisation
    (`PairEncoder.encode`), the model's forward, the event loop's request work (HTTP, JSON, validation) and other."""
    if not path.exists():
        print(f"  py-spy wrote nothing to {path}", flush=True)
        return
    total: dict[str, int] = {}
    busy: dict[str, int] = {}
    parts: dict[tuple[str, str], int] = {}
    for line in path.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        frames = stack.split(";")
        thread, n = frames[0].split(": ", 1)[-1], int(n_text)
        total[thread] = total.get(thread, 0) + n
        if any(leaf in frames[-1] for leaf in IDLE_LEAVES):
            continue
        busy[thread] = busy.get(thread, 0) + n
        part = ("tokenise" if "PairEncoder.encode" in stack else "model forward" if "forward (" in stack
                else "HTTP / JSON / validation" if thread == "MainThread" else "other")
        parts[(thread, part)] = parts.get((thread, part), 0) + n
    print(f"  profile ({path}):", flush=True)
    for thread, n in sorted(total.items(), key=lambda kv: -busy.get(kv[0], 0)):
        shares = ", ".join(f"{part} {m / n:.1%}" for (t, part), m in sorted(parts.items(), key=lambda kv: -kv[1])
                           if t == thread)
        print(f"    {thread}: busy {busy.get(thread, 0) / n:.1%} of {n} samples ({shares or 'idle'})", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, port: int, batching: bool, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "moerm.cli", "serve", run, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--batch-size",
           str(args.batch_size), "--log-level", "warning", "--reload-poll-s", "0"]
    if getattr(args, "max_batch_tokens", None):
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if not batching:
        cmd.append("--no-batching")
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOERM_API_KEY", None)
    return subprocess.Popen(cmd, env=env)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return
            if r.json().get("status") == "error":
                raise RuntimeError(f"server failed to load the model: {r.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready in time")


def server_batches(url: str) -> tuple[float, float, float]:
    """(pairs scored, batches, seconds spent in scoring calls) from /metrics."""
    names = ("moerm_pairs_scored_total", "moerm_batches_total", "moerm_batch_seconds_sum")
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, v = line.partition(" ")
        if name in names:
            values[name] = float(v)
    return tuple(values.get(n, 0.0) for n in names)  # type: ignore[return-value]


async def load(url: str, inputs: list[tuple[str, str]], clients: int, seconds: float, per_request: int,
               ) -> tuple[list[float], int, int, int, list[str], dict[int, float]]:
    """Run the clients for `seconds` (requests sent before the end are still awaited).

    Returns latencies (s) of answered requests, requests answered within the window, sent, errors, error samples,
    and the first reward received for each input.
    """
    latencies: list[float] = []
    in_window = 0
    errors: list[str] = []
    rewards: dict[int, float] = {}
    sent = 0
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        async def one_client(cid: int) -> None:
            nonlocal sent, in_window
            k = cid * 7919
            first = True
            while first or time.monotonic() < end:  # at least one request each, however late the clients start
                first = False
                idx = [(k + j) % len(inputs) for j in range(per_request)]
                k += per_request
                body = {"items": [{"prompt": inputs[i][0], "response": inputs[i][1]} for i in idx]}
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/score", json=body)
                except httpx.HTTPError as e:
                    cause = e.__cause__ or e.__context__
                    errors.append(f"{type(e).__name__}: {e!r} after {time.perf_counter() - t0:.1f} s "
                                  f"(cause: {cause!r})")
                    continue
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(dt)
                in_window += time.monotonic() <= end
                for i, v in zip(idx, r.json()["rewards"]):
                    rewards.setdefault(i, v)

        tasks = [asyncio.create_task(one_client(c)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=seconds + 120)
        for t in pending:
            t.cancel()
    return latencies, in_window, sent, len(errors), errors[:5], rewards


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def run_setting(run: str, setting: Setting, inputs: list[tuple[str, str]], offline: list[float],
                args: argparse.Namespace, system: object) -> Result:
    load_before = loadavg()
    offline_1, cpu_1 = offline_timing(system, inputs, args)
    print(f"  offline system.score before: {offline_1:.1f} pairs/s (load average {load_before})", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(run, port, setting.batching, args)
    try:
        wait_ready(url, proc)
        for i in range(4):  # warm-up: allocator, thread pools
            httpx.post(url + "/v1/score", json={"items": [{"prompt": inputs[i][0], "response": inputs[i][1]}]},
                       timeout=120)
        pairs0, batches0, busy0 = server_batches(url)
        spy = start_py_spy(proc.pid, setting, args) if args.py_spy else None
        cpu0, wall0, loop0 = process_cpu_s(proc.pid), time.perf_counter(), process_cpu_s(proc.pid, proc.pid)
        lat, in_window, sent, n_err, samples, rewards = asyncio.run(
            load(url, inputs, setting.clients, args.seconds, args.items_per_request))
        cpu1, wall1, loop1 = process_cpu_s(proc.pid), time.perf_counter(), process_cpu_s(proc.pid, proc.pid)
        pairs1, batches1, busy1 = server_batches(url)
        if spy is not None:
            spy[0].wait(60)
            print_profile(spy[1])
    finally:
        proc.terminate()  # SIGTERM: graceful shutdown
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    offline_2, cpu_2 = offline_timing(system, inputs, args)
    load_after = loadavg()
    offline_rate = (offline_1 + offline_2) / 2
    print(f"  offline system.score after: {offline_2:.1f} pairs/s (load average {load_after})", flush=True)
    answered = len(lat)
    diff = max((abs(v - offline[i]) for i, v in rewards.items()), default=float("nan"))
    per_s = in_window / args.seconds  # answered within the timed window
    return Result(setting=setting.name, batching=setting.batching, clients=setting.clients, seconds=args.seconds,
                  requests=answered, pairs=answered * args.items_per_request,
                  requests_per_s=round(per_s, 2), pairs_per_s=round(per_s * args.items_per_request, 2),
                  p50_ms=round(percentile(lat, 50) * 1000, 1), p99_ms=round(percentile(lat, 99) * 1000, 1),
                  errors=n_err, lost=sent - answered - n_err,
                  mean_batch_items=round((pairs1 - pairs0) / max(batches1 - batches0, 1), 2),
                  max_abs_diff_vs_offline=diff, offline_pairs_per_s=round(offline_rate, 2),
                  offline_before_after=(round(offline_1, 2), round(offline_2, 2)),
                  vs_offline=round(per_s * args.items_per_request / offline_rate, 3),
                  server_cpu_ms_per_pair=round((cpu1 - cpu0) * 1000 / max(pairs1 - pairs0, 1), 2),
                  server_loop_cpu_ms_per_pair=round((loop1 - loop0) * 1000 / max(pairs1 - pairs0, 1), 2),
                  offline_cpu_ms_per_pair=round((cpu_1 + cpu_2) / 2, 2),
                  server_cpu_share=round((cpu1 - cpu0) / (wall1 - wall0), 2),
                  model_busy=round((busy1 - busy0) / (wall1 - wall0), 3),
                  load_before=load_before, load_after=load_after, error_samples=samples)


def offline_in_calls(system: object, inputs: list[tuple[str, str]], args: argparse.Namespace,
                     call: int) -> tuple[float, float]:
    """Offline (pairs/s, CPU ms per pair) of the server's own scoring function (`system_score_fn`: the token-budget
    passes) over the inputs in a random order, cut into calls of `call` pairs as the server's batcher gathered them:
    the server's forward work without its HTTP, queue and threads. Server / this is the serving layer's cost; this /
    offline `score` is the cost of scoring calls of mixed requests instead of one length-sorted stream."""
    from moerm.serve.app import system_score_fn

    fn = system_score_fn(system, args.batch_size, args.max_batch_tokens)
    order = list(range(len(inputs)))
    random.Random(0).shuffle(order)
    calls = [[inputs[i] for i in order[s:s + call]] for s in range(0, len(order), call)]
    fn([p for p, _ in calls[0][:4]], [r for _, r in calls[0][:4]], None)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - t0 < args.offline_seconds:
        for c in calls:
            fn([p for p, _ in c], [r for _, r in c], None)
            n += len(c)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder or saved model folder")
    ap.add_argument("--data", default="examples/data", help="held-out pairs (test* files in folders)")
    ap.add_argument("--inputs", type=int, default=128, help="distinct (prompt, response) inputs cycled by clients")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--stress-clients", type=int, default=64,
                    help="clients of the errors / lost-requests run (0: skip)")
    ap.add_argument("--seconds", type=float, default=15.0, help="timed load per setting")
    ap.add_argument("--items-per-request", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="forward batch size of the server and of offline scoring (default: the server's own)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch CPU threads of the server and of offline scoring (default: torch's)")
    ap.add_argument("--settings", default="on,off,stress",
                    help="which server settings to run, of: on, off (at --clients), stress (at --stress-clients)")
    ap.add_argument("--offline-seconds", type=float, default=5.0, help="how long each offline timing runs")
    ap.add_argument("--offline-also", default="", metavar="B,B,...",
                    help="also time offline scoring at these forward batch sizes, once, for context")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="sample the server with py-spy during each load (py-spy on PATH or beside this Python): "
                         "raw stacks written to DIR, where each thread's time went printed")
    ap.add_argument("--only-stress", type=int, default=0, metavar="N",
                    help="run only the --stress-clients setting, N times (errors / lost-requests check)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--batch-sizes", default="", metavar="B,B,...",
                    help="run the 'on' setting at each forward batch size, with token-budget batching, against "
                         "offline scoring at that size (replaces --settings)")
    ap.add_argument("--budget", default="auto", help="with --batch-sizes: the token budget of a forward pass: auto "
                    "(b x the inputs' median token count), a number of tokens, or none (passes of b rows)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from moerm.data.readers import load_pairs
    from moerm.cpu_memory import keep_cpu_memory
    from moerm.serve.config import ServeConfig
    from moerm.systems.base import load_system

    if args.batch_size is None:
        args.batch_size = ServeConfig.batch_size
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    keep_cpu_memory()  # offline scoring as `moerm score` runs it (the server, started by the CLI, does the same)

    pairs, _ = load_pairs([args.data], split="test")
    random.Random(0).shuffle(pairs)
    inputs = [(p.prompt, p.chosen) for p in pairs[: args.inputs]]
    t0 = time.perf_counter()
    system = load_system(args.run)
    offline = system.score([p for p, _ in inputs], [r for _, r in inputs], batch_size=32).rewards
    print(f"offline scores of {len(inputs)} inputs: {time.perf_counter() - t0:.1f} s "
          f"(torch threads {torch.get_num_threads()})", flush=True)

    offline_at: dict[int, float] = {}
    for bs in (int(x) for x in args.offline_also.split(",") if x.strip()):
        offline_at[bs] = offline_timing(system, inputs, argparse.Namespace(**{**vars(args), "batch_size": bs}))[0]
        print(f"offline system.score at batch size {bs}: {offline_at[bs]:.1f} pairs/s (load average {loadavg()})",
              flush=True)

    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if sizes:
        from moerm.serve.forward import length_fn

        counts = sorted(length_fn(system)[0]([p for p, _ in inputs], [r for _, r in inputs]))
        median = counts[len(counts) // 2]
        per_size: list[dict[str, object]] = []
        for b in sizes:
            budget = None if args.budget == "none" else b * median if args.budget == "auto" else int(args.budget)
            sub = argparse.Namespace(**{**vars(args), "batch_size": b, "max_batch_tokens": budget})
            s = Setting(f"batching on, {args.clients} clients, batch {b}, budget {budget or 'none'} tokens", True,
                        args.clients)
            print(f"running: {s.name} for {args.seconds:.0f} s ...", flush=True)
            r = run_setting(args.run, s, inputs, offline, sub, system)
            print("  " + json.dumps(asdict(r)), flush=True)
            calls_rate, calls_cpu = offline_in_calls(system, inputs, sub, max(1, round(r.mean_batch_items)))
            print(f"  offline in the server's calls of {round(r.mean_batch_items)} pairs: {calls_rate:.1f} pairs/s, "
                  f"{calls_cpu:.1f} CPU ms/pair (load average {loadavg()})", flush=True)
            per_size.append({"batch_size": b, "max_batch_tokens": budget, **asdict(r),
                             "offline_in_calls_pairs_per_s": round(calls_rate, 2),
                             "offline_in_calls_cpu_ms_per_pair": round(calls_cpu, 2),
                             "vs_offline_in_calls": round(r.pairs_per_s / calls_rate, 3)})
        print(f"\nmedian tokens per pair {median}\n\n| batch | budget | pairs/s | offline pairs/s | vs offline | "
              "offline in the server's calls | vs those | CPU ms/pair server (event loop) / in calls / offline | "
              "p50 ms | p99 ms | errors | lost | mean batch |\n|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"
              "---:|---:|")
        for r in per_size:
            print(f"| {r['batch_size']} | {r['max_batch_tokens']} | {r['pairs_per_s']:.1f} | "
                  f"{r['offline_pairs_per_s']:.1f} | {r['vs_offline']:.2f}x | {r['offline_in_calls_pairs_per_s']:.1f} | "
                  f"{r['vs_offline_in_calls']:.2f}x | {r['server_cpu_ms_per_pair']:.1f} "
                  f"({r['server_loop_cpu_ms_per_pair']:.1f}) / {r['offline_in_calls_cpu_ms_per_pair']:.1f} / "
                  f"{r['offline_cpu_ms_per_pair']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                  f"{r['errors']} | {r['lost']} | {r['mean_batch_items']:.1f} |")
        checks = {"scores_equal_offline_1e-4": all(r["max_abs_diff_vs_offline"] <= 1e-4 for r in per_size),
                  "server_at_least_0.9x_offline_at_every_size": all(r["vs_offline"] >= 0.9 for r in per_size),
                  "p99_at_most_2x_p50": all(r["p99_ms"] <= 2 * r["p50_ms"] for r in per_size),
                  "zero_errors_and_lost": all(r["errors"] == 0 and r["lost"] == 0 for r in per_size)}
        print("checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
                "torch_threads": args.torch_threads, "median_tokens": median, "inputs": len(inputs),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "by_batch_size": per_size,
                "checks": checks}, indent=2))
            print(f"written: {args.out}")
        return

    wanted = {x.strip() for x in args.settings.split(",") if x.strip()}
    if not wanted <= {"on", "off", "stress"}:
        ap.error(f"--settings takes on, off, stress; got {args.settings!r}")
    settings = [Setting(f"batching on, {args.clients} clients", True, args.clients)] if "on" in wanted else []
    if "off" in wanted:
        settings.append(Setting(f"batching off, {args.clients} clients", False, args.clients))
    stress = Setting(f"batching on, {args.stress_clients} clients", True, args.stress_clients)
    if args.stress_clients and "stress" in wanted:
        settings.append(stress)
    if args.only_stress:
        settings = [stress] * args.only_stress
    results = []
    for s in settings:
        print(f"running: {s.name} for {args.seconds:.0f} s ...", flush=True)
        results.append(run_setting(args.run, s, inputs, offline, args, system))
        print("  " + json.dumps(asdict(results[-1])), flush=True)

    pair = [r for r in results if r.clients == args.clients and not args.only_stress]
    on = next((r for r in pair if r.batching), None)
    off = next((r for r in pair if not r.batching), None)
    ratio = on.pairs_per_s / off.pairs_per_s if on and off and off.pairs_per_s else None
    stressed = [r for r in results if r.clients == args.stress_clients and r.batching]
    max_diff = max(r.max_abs_diff_vs_offline for r in results)
    checks = {"scores_equal_offline_1e-4": max_diff <= 1e-4}
    if ratio is not None:
        checks["batching_speedup_at_least_3x"] = ratio >= 3.0
    if on is not None:
        checks["server_at_least_0.9x_offline"] = on.vs_offline >= 0.9
        checks["p99_at_most_2x_p50"] = on.p99_ms <= 2 * on.p50_ms
    if stressed:
        checks["zero_errors_and_lost_under_stress"] = all(r.errors == 0 and r.lost == 0 for r in stressed)
    header = ("| setting | pairs/s | offline pairs/s (before, after) | vs offline | p50 ms | p99 ms | errors | lost | "
              "mean batch | model busy | CPU ms/pair server (its event loop) / offline | server CPU share | "
              "load average before / after |")
    print("\n" + header + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        b, a = r.offline_before_after
        print(f"| {r.setting} | {r.pairs_per_s:.1f} | {r.offline_pairs_per_s:.1f} ({b:.1f}, {a:.1f}) | "
              f"{r.vs_offline:.2f}x | {r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.errors} | {r.lost} | "
              f"{r.mean_batch_items:.1f} | {r.model_busy:.0%} | "
              f"{r.server_cpu_ms_per_pair:.1f} ({r.server_loop_cpu_ms_per_pair:.1f}) / {r.offline_cpu_ms_per_pair:.1f} | "
              f"{r.server_cpu_share:.2f} | {r.load_before[0]:.2f} / {r.load_after[0]:.2f} |")
    print(f"\ntorch threads {torch.get_num_threads()}, forward batch size {args.batch_size}, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs")
    if on is not None:
        print(f"server / offline at {args.clients} clients: {on.vs_offline:.2f}x pairs/s; p99 / p50 "
              f"{on.p99_ms / on.p50_ms:.2f}")
    if ratio is not None:
        print(f"batching on / off at {args.clients} clients: {ratio:.2f}x pairs/s")
    print(f"largest |served - offline| reward difference: {max_diff:.2e}")
    print("checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
            "torch_threads": args.torch_threads, "batch_size": args.batch_size,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "inputs": len(inputs), "results": [asdict(r) for r in results], "speedup_on_vs_off": ratio,
            "server_vs_offline": on.vs_offline if on is not None else None, "offline_at_batch_size": offline_at,
            "max_abs_diff_vs_offline": max_diff, "checks": checks}, indent=2))
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
