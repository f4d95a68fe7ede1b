"""From one process to a cluster: the plain server against Ray Serve at 1 and 2 replicas, and a live route swap
under load.

    .venv/bin/python benchmarks/serve_cluster.py --seconds 15                 # tiny random models, built offline
    .venv/bin/python benchmarks/serve_cluster.py --run runs/demo/baseline --routed-run runs/demo/rodos \\
        --swap-data examples/data/NEWDOMAIN/train.jsonl --seconds 30

Modes (`--modes`, default all):
- `plain`: `moerm serve RUN` (one process) under `--clients` clients sending 1-4 pairs per request for `--seconds`;
- `ray1`, `ray2`: the same app as a Ray Serve deployment of 1 and 2 replicas (a local Ray instance with
  `--ray-cpus` CPUs, each replica `--torch-threads` threads), same clients. Reported: pairs/s, p50/p99, and the
  ratios ray1 / plain (the Ray path's overhead; target at most 10% below) and ray2 / ray1 (at most 2x);
- `swap`: a routed run (`--routed-run`, or a tiny RODOS trained here on two domains) served by `moerm serve`
  polling its folder; while the clients score, `moerm add-domain` adds a third domain. Every answer must be a 200
  whose rewards equal offline `score` of the router version its `X-Moerm-Router-Version` header names (both versions
  scored offline, before and after): target 0 lost, 0 wrong, and the new version picked up without a restart.

Every reward of every mode is checked against offline `system.score` (1e-5). The machine's load average is printed
beside the figures: on a shared machine the speed ratios say little; the correctness counts hold whatever the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_faults import free_port, pct, pool, tiny_model  # noqa: E402

VERSION_HEADER = "X-Moerm-Router-Version"


async def clients(url: str, items: list[tuple[str, str]], seconds: float, n: int,
                  until: asyncio.Event | None = None) -> dict[str, Any]:
    """`n` clients for `seconds` (or until `until` is set), each sending 1-4 pairs per request; every answer is kept
    (pair indices, the router version it names, its rewards) to be checked by `check` once every version's offline
    rewards are known."""
    out: dict[str, Any] = {"lost": 0, "pairs": 0, "latency": [], "answers": [], "samples": []}
    stop = time.monotonic() + seconds
    t_start = time.monotonic()

    def running() -> bool:
        return not until.is_set() if until is not None else time.monotonic() < stop

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while running():
                idx = [rng.randrange(len(items)) for _ in range(rng.randint(1, 4))]
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/score", json={"items": [{"prompt": items[i][0], "response": items[i][1]}
                                                                  for i in idx]})
                except httpx.HTTPError as e:
                    out["lost"] += 1
                    out["samples"].append(repr(e)[:160])
                    continue
                if r.status_code != 200:
                    out["lost"] += 1
                    out["samples"].append(f"{r.status_code}: {r.text[:160]}")
                    continue
                out["answers"].append((idx, r.headers.get(VERSION_HEADER, "none"), r.json()["rewards"]))
                out["pairs"] += len(idx)
                out["latency"].append(time.perf_counter() - t0)

    await asyncio.gather(*(one(s) for s in range(n)))
    out["pairs_per_s"] = out["pairs"] / (time.monotonic() - t_start)
    out["p50_ms"], out["p99_ms"] = 1000 * pct(out["latency"], 0.5), 1000 * pct(out["latency"], 0.99)
    del out["latency"]
    return out


def check(out: dict[str, Any], offline: dict[str, list[float]]) -> dict[str, Any]:
    """Count right and wrong answers: each against the offline rewards of the version its header names."""
    out["ok"] = out["wrong"] = 0
    out["versions"] = {}
    for idx, version, got in out.pop("answers"):
        want = offline.get(version)
        out["versions"][version] = out["versions"].get(version, 0) + 1
        if want is None or any(g is None or abs(g - want[i]) > 1e-5 for g, i in zip(got, idx)):
            out["wrong"] += 1
        else:
            out["ok"] += 1
    return out


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready within {timeout} s")


def serve_plain(run: str, port: int, args: argparse.Namespace, poll: float = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOERM_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "moerm.cli", "serve", run, "--port", str(port), "--log-level",
                             "warning", "--torch-threads", str(args.torch_threads), "--reload-poll-s", str(poll)],
                            env=env, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def tiny_rodos(root: Path) -> tuple[Path, Path]:
    """A RODOS run on two domains over the tiny random BERT, and a third domain's pairs to add."""
    import dataclasses

    import torch

    from moerm.config import ModelConfig, RunConfig, TrainConfig
    from moerm.data.readers import write_jsonl
    from moerm.data.schema import PreferencePair
    from moerm.systems import build_system
    from moerm.systems.base import FitContext

    backbone = tiny_model(root / "base").parent / "backbone"  # the tiny BERT folder tiny_model saved

    def pairs(domain: str, prefix: str, n: int, seed: int) -> list[PreferencePair]:
        rng = random.Random(seed)
        return [PreferencePair(id=f"{domain}-{i}", domain=domain, prompt=f"{prefix} {p}", chosen=f"{r} good great",
                               rejected=f"{r} bad awful") for i, (p, r) in enumerate(pool(n, rng.randrange(10**6)))]

    torch.manual_seed(0)
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=str(backbone), max_length=32),
                    train=dataclasses.replace(TrainConfig(), lr=5e-4, batch_size=8, epochs=1, save_every=0),
                    options={"routing": "hard", "min_confidence": 0.0},
                    components={"router": {"train": {"epochs": 5, "lr": 2e-2}}})
    system = build_system(cfg)
    system.fit(pairs("alpha", "tell me about the topic", 16, 1) + pairs("beta", "please explain why", 16, 2), None,
               FitContext(root / "rodos", progress=False))
    system.save(root / "rodos" / "model")
    write_jsonl(pairs("gamma", "what is this and that", 16, 3), root / "gamma.jsonl")
    return root / "rodos", root / "gamma.jsonl"


def swap_mode(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from moerm.systems import load_system

    if args.routed_run:
        run = root / "routed"
        shutil.copytree(args.routed_run, run)  # add-domain changes the run: work on a copy
        data = Path(args.swap_data)
    else:
        run, data = tiny_rodos(root)
    items = [(f"what is this and that {p}", r) for p, r in pool(16, seed=7)] + pool(16, seed=8)  # some go to the new domain
    ps, rs = [p for p, _ in items], [r for _, r in items]
    before = load_system(run)
    offline = {str(before.router_version): before.score(ps, rs).rewards}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_plain(str(run), port, args, poll=0.2)
    try:
        wait_ready(url)

        async def go() -> dict[str, Any]:
            # the clients run from before add-domain starts until --seconds after the server has swapped
            done = asyncio.Event()
            load = asyncio.create_task(clients(url, items, args.seconds, args.clients, until=done))
            await asyncio.sleep(min(1.0, args.seconds / 4))
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            add = await asyncio.create_subprocess_exec(sys.executable, "-m", "moerm.cli", "add-domain", str(run),
                                                       "--data", str(data), "--no-progress", env=env,
                                                       stdout=asyncio.subprocess.DEVNULL)
            code = await add.wait()
            deadline = time.monotonic() + 120
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                while time.monotonic() < deadline and code == 0:
                    if (await c.get("/v1/info")).json().get("router_version") != before.router_version:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(args.seconds)
            done.set()
            res = await load
            res["add_domain_exit"] = code
            return res

        res = asyncio.run(go())
        info = httpx.get(url + "/v1/info", timeout=30).json()
    finally:
        stop(proc)
    after = load_system(run)  # the new version's offline rewards: known once add-domain has saved it
    offline[str(after.router_version)] = after.score(ps, rs).rewards
    res = check(res, offline)
    res["router_version_served_at_end"] = info.get("router_version")
    res["router_version_saved"] = after.router_version
    return res


ROLES = (("moerm.cli serve", "server"), ("ServeReplica", "replica"), ("ProxyActor", "Ray proxy"),
         ("ServeController", "Ray controller"), ("raylet", "Ray daemons"), ("gcs_server", "Ray daemons"),
         ("ray", "Ray daemons"))  # the first key a process's command line holds names its role


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds so far (user + system, all threads) and its role: this process (the clients,
    and the Ray driver in the Ray modes), the server, a Ray replica, Ray's proxy, controller or daemons, or other
    work on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        pid = int(entry.name)
        role = "clients (this process)" if pid == os.getpid() else next(
            (r for key, r in ROLES if key in cmd), "other")
        out[pid] = (role, seconds)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role used between two snapshots (a process born in between counts from 0)."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used[role] = used.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return {role: round(s, 2) for role, s in sorted(used.items()) if s > 0.005}


def measured(url: str, items: list[tuple[str, str]], offline: list[float], args: argparse.Namespace) -> dict[str, Any]:
    """The clients' load on `url`, checked against offline rewards, with the CPU seconds of each role meanwhile."""
    before = cpu_snapshot()
    res = asyncio.run(clients(url, items, args.seconds, args.clients))
    res["cpu_seconds"] = cpu_by_role(before, cpu_snapshot())
    return check(res, {"none": offline})


def held_out_items(data: str, n: int) -> list[tuple[str, str]]:
    """`n` (prompt, chosen reply) pairs of `data`'s held-out split, one prompt after another over the domains."""
    from moerm.data.readers import load_pairs
    from moerm.runs import sample_round_robin

    pairs, _ = load_pairs([data], split="test")
    if not pairs:
        raise SystemExit(f"error: {data}: no held-out pairs")
    picked = sample_round_robin(pairs, max(1, n // len({p.domain for p in pairs})), seed=0)[:n]
    return [(p.prompt, p.chosen) for p in picked]


def ray_mode(run: str, replicas: int, items: list[tuple[str, str]], offline: list[float],
             args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from moerm.serve.config import ServeConfig
    from moerm.serve.ray_serve import ReplicaSpec, start

    port = free_port()
    if not ray.is_initialized():
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        start(run, ServeConfig(port=port, torch_threads=args.torch_threads, reload_poll_s=0),
              ReplicaSpec(replicas, args.ray_cpus / replicas))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        return measured(url, items, offline, args)
    finally:
        serve.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a saved run (default: a tiny random baseline built offline)")
    ap.add_argument("--routed-run", help="a routed run (rodos, arliss) for the swap mode (copied; default: tiny)")
    ap.add_argument("--swap-data", help="the new domain's pairs for add-domain in the swap mode")
    ap.add_argument("--modes", default="plain,ray1,ray2,swap")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--ray-cpus", type=float, default=2.0, help="CPUs of the local Ray instance")
    ap.add_argument("--data", help="the clients send these held-out pairs (prompt, chosen reply; folder or file) "
                    "instead of short random texts: real lengths, so the model's share of the time is real")
    ap.add_argument("--items", type=int, default=64, help="how many distinct pairs the clients cycle through")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.routed_run and not args.swap_data:
        ap.error("--routed-run needs --swap-data (the new domain's pairs)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from moerm.systems import load_system

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="moerm-cluster-") as tmp:
        root = Path(tmp)
        run = args.run or str(tiny_model(root / "plain"))
        items = held_out_items(args.data, args.items) if args.data else pool(args.items)
        offline = [float(r) for r in load_system(run).score([p for p, _ in items], [r for _, r in items]).rewards]
        if "plain" in modes:
            port = free_port()
            proc = serve_plain(run, port, args)
            try:
                wait_ready(f"http://127.0.0.1:{port}")
                results["plain"] = measured(f"http://127.0.0.1:{port}", items, offline, args)
            finally:
                stop(proc)
        for mode, n in (("ray1", 1), ("ray2", 2)):
            if mode in modes:
                results[mode] = ray_mode(run, n, items, offline, args)
        if "swap" in modes:
            results["swap"] = swap_mode(args, root)
    results["load_average_after"] = os.getloadavg()

    for mode in ("plain", "ray1", "ray2", "swap"):
        r = results.get(mode)
        if r is not None:
            print(f"{mode}: {r['ok']} answered right, {r['wrong']} wrong, {r['lost']} lost; {r['pairs_per_s']:.1f} "
                  f"pairs/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; versions {r['versions']}"
                  + (f"; samples {r['samples'][:3]}" if r["samples"] else ""))
            if r.get("cpu_seconds") and r["pairs"]:
                print("  CPU ms per pair: " + ", ".join(f"{role} {1000 * s / r['pairs']:.1f}"
                                                          for role, s in r["cpu_seconds"].items()))
    if "plain" in results and "ray1" in results and results["plain"]["pairs_per_s"]:
        print(f"Ray path at 1 replica / plain server: {results['ray1']['pairs_per_s'] / results['plain']['pairs_per_s']:.2f}x")
    if "ray1" in results and "ray2" in results and results["ray1"]["pairs_per_s"]:
        print(f"2 replicas / 1 replica: {results['ray2']['pairs_per_s'] / results['ray1']['pairs_per_s']:.2f}x")
    if "swap" in results:
        s = results["swap"]
        print(f"live swap: add-domain exit {s['add_domain_exit']}, router version served at the end "
              f"{s['router_version_served_at_end']} (saved {s['router_version_saved']})")
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}; "
          f"{results['cpus']} CPUs")
    checks = {m: results[m]["wrong"] == 0 and results[m]["lost"] == 0 for m in ("plain", "ray1", "ray2", "swap")
              if m in results}
    if "swap" in results:
        s = results["swap"]
        checks["swap_picked_up"] = s["router_version_served_at_end"] == s["router_version_saved"]
    print("checks (0 lost, 0 wrong): " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "checks": checks}, indent=2, default=str))


if __name__ == "__main__":
    main()
