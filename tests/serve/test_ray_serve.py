"""Replicas on Ray Serve, on a local Ray instance on CPU: 2 replicas answer 32 clients with every reward equal to
offline `score`; a replica killed mid-load is replaced, and no request gets a wrong reward (one that was on the
killed replica fails with a 5xx)."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from moerm.config import ModelConfig, RunConfig
from moerm.serve import ServeConfig

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from moerm.serve.ray_serve import DEPLOYMENT, ReplicaSpec, app_builder, start  # noqa: E402
from moerm.systems import build_system, load_system  # noqa: E402

WORDS = "good great helpful bad awful wrong the a answer question about topic please explain tell me how".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pairs(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(2, 9))), " ".join(rng.choices(WORDS, k=rng.randint(1, 14))))
            for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("ray-run")
    torch.manual_seed(0)
    build_system(RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=32))).save(
        root / "run" / "model")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    port = free_port()
    try:
        start(str(root / "run"), ServeConfig(port=port, torch_threads=1, max_wait_ms=2), ReplicaSpec(2, 0.5))
        yield f"http://127.0.0.1:{port}", root / "run"
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas() -> list[dict[str, Any]]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT}#" in a["name"]]


def running() -> int:
    app = serve.status().applications.get(DEPLOYMENT)
    if app is None:
        return 0
    return int(app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def hammer(url: str, items: list[tuple[str, str]], offline: list[float], clients: int, requests: int,
           tally: dict[str, int] | None = None) -> dict[str, int]:
    """`clients` threads, each posting `requests` requests of 1-4 pairs; tallies (into `tally`, as they come) ok
    (200, rewards equal offline), wrong (200, a reward off), client errors (4xx), server errors (5xx) and requests
    that got no answer at all (dropped)."""
    tally = tally if tally is not None else {"ok": 0, "wrong": 0, "4xx": 0, "5xx": 0, "dropped": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(requests):
                idx = [rng.randrange(len(items)) for _ in range(rng.randint(1, 4))]
                body = {"items": [{"prompt": items[i][0], "response": items[i][1]} for i in idx]}
                try:
                    r = c.post("/v1/score", json=body)
                except httpx.HTTPError:
                    key = "dropped"  # no answer at all
                else:
                    if r.status_code == 200:
                        got = r.json()["rewards"]
                        key = "ok" if all(abs(g - offline[i]) <= 1e-5 for g, i in zip(got, idx)) else "wrong"
                    else:
                        key = "5xx" if r.status_code >= 500 else "4xx"
                with lock:
                    tally[key] += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return tally


def test_two_replicas_answer_32_clients_with_offline_rewards_and_survive_a_killed_replica(
        cluster: tuple[str, Path]) -> None:
    url, run = cluster
    items = pairs(48)
    offline = [float(r) for r in load_system(run).score([p for p, _ in items], [r for _, r in items]).rewards]
    assert running() == 2 and len(replicas()) == 2
    info = httpx.get(url + "/v1/info", timeout=30).json()
    assert info["server"]["max_wait_ms"] == 2 and info["system"] == "baseline"  # each replica: the same app

    first = hammer(url, items, offline, clients=32, requests=3)
    assert first == {"ok": 96, "wrong": 0, "4xx": 0, "5xx": 0, "dropped": 0}

    victim = replicas()[0]
    during = {"ok": 0, "wrong": 0, "4xx": 0, "5xx": 0, "dropped": 0}
    load = threading.Thread(target=hammer, args=(url, items, offline), kwargs={"clients": 32, "requests": 8,
                                                                                  "tally": during})
    load.start()
    deadline = time.monotonic() + 300
    while sum(during.values()) < 32 and time.monotonic() < deadline:  # a quarter of the 256 requests answered
        time.sleep(0.01)
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    load.join(600)
    print(f"while a replica was killed: {during}")
    assert sum(during.values()) == 256
    assert during["wrong"] == 0 and during["4xx"] == 0 and during["dropped"] == 0, during
    assert during["ok"] > 0

    deadline = time.monotonic() + 120
    while not (running() == 2 and victim["name"] not in {a["name"] for a in replicas()}):
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    after = hammer(url, items, offline, clients=32, requests=2)
    assert after == {"ok": 64, "wrong": 0, "4xx": 0, "5xx": 0, "dropped": 0}


def test_the_serve_run_builder_reads_settings_and_refuses_unknown_ones() -> None:
    app = app_builder({"run": "some/run", "replicas": "3", "max_batch_tokens": "4096", "max_wait_ms": "1.5",
                       "query_template": "auto"})
    assert app is not None
    with pytest.raises(Exception, match="not a server setting"):
        app_builder({"run": "r", "max_btach": "4"})
    with pytest.raises(Exception, match="needs run="):
        app_builder({"replicas": "2"})
