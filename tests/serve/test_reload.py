"""Routes swapped live: `moerm add-domain` on a served run reaches the server without a restart, and no request in
flight fails or gets a reward of another version than the one its answer names."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from conftest import toy_pairs
from moerm.cli import app
from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.data.readers import write_jsonl
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.serve.app import VERSION_HEADER
from moerm.serve.reload import marker_path, read_marker
from moerm.systems import build_system, load_system
from moerm.systems.base import FitContext

PREFIX = {"alpha": "tell me about the topic", "beta": "please explain why", "gamma": "what is this and that"}
KEY = "reload-key"


def domain_pairs(domain: str, n: int, seed: int) -> list[Any]:
    return [dataclasses.replace(p, prompt=f"{PREFIX[domain]} {p.prompt}") for p in toy_pairs(n, seed, domain)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Path:
    """A RODOS run on alpha + beta (tiny BERT, trained briefly): built once, copied for each test."""
    root = tmp_path_factory.mktemp("served-rodos")
    cfg = RunConfig(system="rodos", model=ModelConfig(backbone=tiny_bert, max_length=32),
                    train=TrainConfig(lr=5e-4, batch_size=8, epochs=1, save_every=0),
                    options={"routing": "hard", "min_confidence": 0.0},
                    components={"router": {"train": {"epochs": 5, "lr": 2e-2}}})
    system = build_system(cfg)
    system.fit(domain_pairs("alpha", 16, 1) + domain_pairs("beta", 16, 2), None,
               FitContext(root / "run", progress=False))
    system.save(root / "run" / "model")
    return root / "run"


@pytest.fixture()
def rodos_run(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


def score(url: str, items: list[Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/score", json={"items": [{"prompt": p.prompt, "response": p.chosen} for p in items]},
                      headers=headers, timeout=60)


def test_add_domain_on_a_served_run_is_picked_up_without_a_restart(rodos_run: Path, tmp_path: Path) -> None:
    probe = domain_pairs("gamma", 4, 5) + domain_pairs("alpha", 4, 6)
    prompts, responses = [p.prompt for p in probe], [p.chosen for p in probe]
    offline = {0: load_system(rodos_run).score(prompts, responses).rewards}
    cfg = ServeConfig(reload_poll_s=0.05, api_key=KEY, max_wait_ms=2)
    auth = {"Authorization": f"Bearer {KEY}"}
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=auth) as c:
            while not stop.is_set():
                answers.append(c.post("/v1/score", json={"items": [{"prompt": p, "response": r}
                                                                   for p, r in zip(prompts, responses)]}))

    with BackgroundServer(create_app(str(rodos_run), cfg)) as srv:
        srv.wait_ready()
        info = httpx.get(srv.url + "/v1/info", headers=auth).json()
        assert info["router_version"] == 0 and info["domains"] == ["alpha", "beta"] and info["loads"] == 1
        clients = [threading.Thread(target=client, args=(srv.url,)) for _ in range(4)]
        for t in clients:
            t.start()
        write_jsonl(domain_pairs("gamma", 16, 3), tmp_path / "gamma.jsonl")
        res = CliRunner().invoke(app, ["add-domain", str(rodos_run), "--data", str(tmp_path / "gamma.jsonl"),
                                       "--no-progress"])
        assert res.exit_code == 0, res.output
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/v1/info", headers=auth).json()["router_version"] != 1:
            assert time.monotonic() < deadline, "the new router version was not picked up"
            time.sleep(0.05)
        time.sleep(0.3)  # some requests on the new version too
        stop.set()
        for t in clients:
            t.join(60)
        info = httpx.get(srv.url + "/v1/info", headers=auth).json()
        forced_unauth = httpx.post(srv.url + "/v1/reload", timeout=60)
        forced = httpx.post(srv.url + "/v1/reload", headers=auth, timeout=60)
        after = score(srv.url, probe, auth)
    offline[1] = load_system(rodos_run).score(prompts, responses).rewards
    assert info["domains"] == ["alpha", "beta", "gamma"] and info["loads"] == 2 and info["reload_error"] is None
    assert offline[0] != offline[1]  # the new router sends gamma prompts to gamma's RM: the versions differ
    # every request answered, each with the rewards of the version its answer names
    assert answers and all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    seen = {int(a.headers[VERSION_HEADER]) for a in answers}
    assert seen == {0, 1}
    for a in answers:
        got, want = a.json()["rewards"], offline[int(a.headers[VERSION_HEADER])]
        assert all(abs(g - w) <= 1e-5 for g, w in zip(got, want)), (a.headers[VERSION_HEADER], got, want)
    assert forced_unauth.status_code == 401
    assert forced.status_code == 200 and forced.json()["router_version"] == 1 and forced.json()["swapped"]
    assert after.headers[VERSION_HEADER] == "1"


def test_reload_needs_a_key_and_a_run_folder_and_a_failed_load_keeps_serving(rodos_run: Path) -> None:
    with BackgroundServer(create_app(str(rodos_run), ServeConfig(reload_poll_s=0))) as srv:
        srv.wait_ready()
        assert httpx.post(srv.url + "/v1/reload", timeout=30).status_code == 403
    system = load_system(rodos_run)
    with BackgroundServer(create_app(system, ServeConfig(api_key=KEY))) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/reload", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 409
    auth = {"Authorization": f"Bearer {KEY}"}
    marker = marker_path(rodos_run)
    with BackgroundServer(create_app(str(rodos_run), ServeConfig(reload_poll_s=0.05, api_key=KEY))) as srv:
        srv.wait_ready()
        good = score(srv.url, domain_pairs("alpha", 2, 7), auth).json()["rewards"]
        saved = marker.read_bytes()
        marker.write_text("{ broken")  # a damaged save: the marker moved, the load fails
        try:
            deadline = time.monotonic() + 30
            while httpx.get(srv.url + "/v1/info", headers=auth).json()["reload_error"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            again = score(srv.url, domain_pairs("alpha", 2, 7), auth)
            info = httpx.get(srv.url + "/v1/info", headers=auth).json()
        finally:
            marker.write_bytes(saved)
    assert again.status_code == 200 and again.json()["rewards"] == good and again.headers[VERSION_HEADER] == "0"
    assert info["router_version"] == 0 and info["loads"] == 1 and "system.json" in info["reload_error"]
    assert read_marker(marker) is not None
