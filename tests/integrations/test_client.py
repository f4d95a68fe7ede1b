"""The trainer-side client on a busy cluster: connection errors and timeouts retried with backoff, a 4xx raised at
once, a non-finite reward an error (never a silent None); the route fields reach TRL's logging hooks."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from moerm.integrations.client import RewardClient, RewardError
from moerm.integrations.logs import batch_metrics, item_fields, numeric_columns
from moerm.integrations.trl import reward_function
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.systems.base import ScoreOutput


class Fake:
    """reward = len(prompt) + len(response) / 1000 (NaN for a response "nan"); the first call can be slow."""

    name = "fake"
    domains = ["math", "code"]

    def __init__(self, first_delay: float = 0.0) -> None:
        self.calls = 0
        self.first_delay = first_delay

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.calls += 1
        if self.calls == 1 and self.first_delay:
            time.sleep(self.first_delay)
        ds = list(domains or [None] * len(prompts))
        details = [{"routed_domain": d, "route_source": "given" if d else "fallback", "fallback": d is None,
                    "weights": {} if d else {"math": 0.5, "code": 0.5}, "ood": d is None,
                    **({"capability_scores": {"logic": 1.0, "style": -1.0}} if d == "math" else {})} for d in ds]
        rewards = [math.nan if r == "nan" else len(p) + len(r) / 1000 for p, r in zip(prompts, responses)]
        return ScoreOutput(rewards, details)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_is_retried_until_the_server_is_up() -> None:
    port = free_port()
    srv = BackgroundServer(create_app(Fake(), ServeConfig()), port=port)
    threading.Timer(0.6, srv.start).start()  # nothing listens for the first tries
    try:
        client = RewardClient(f"http://127.0.0.1:{port}", retries=8, backoff_s=0.1, max_backoff_s=0.4)
        assert client.score(["ab"], ["xyz"]) == [2.003]
    finally:
        time.sleep(0.1)
        srv.stop()
    with pytest.raises(RewardError, match=r"unreachable after 3 tries: ConnectError"):
        RewardClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01).score(["a"], ["b"])


def test_a_timeout_is_retried_and_a_4xx_is_not() -> None:
    fake = Fake(first_delay=1.5)
    with BackgroundServer(create_app(fake, ServeConfig())) as srv:
        srv.wait_ready()
        client = RewardClient(srv.url, timeout=0.5, retries=6, backoff_s=0.2)
        assert client.score(["ab"], ["x"]) == [2.001]  # the first try timed out while the server was busy
        calls = fake.calls
        with pytest.raises(RewardError, match="answered 413: items.0.domain: 40000 characters"):
            client.score(["a"], ["b"], ["x" * 40_000])  # the client's to fix: raised at once, not retried
        assert fake.calls == calls


def test_non_finite_rewards_are_errors_locally_and_over_http(monkeypatch: pytest.MonkeyPatch) -> None:
    with BackgroundServer(create_app(Fake(), ServeConfig())) as srv:
        srv.wait_ready()
        with pytest.raises(RewardError, match=r"no finite reward for item 1 \(1 of 2 items\); prompt starts 'q2'"):
            reward_function(srv.url)(["q1", "q2"], ["fine", "nan"])


def test_route_fields_reach_trls_logging_hooks() -> None:
    metrics: dict[str, float] = {}
    columns: dict[str, list[Any]] = {}
    with BackgroundServer(create_app(Fake(), ServeConfig())) as srv:
        srv.wait_ready()
        rewards = reward_function(srv.url)(["a", "bb", "ccc", "dd"], ["x", "y", "z", "w"],
                                           domain=["math", "code", None, "math"],
                                           log_metric=metrics.__setitem__, log_extra=columns.__setitem__)
    assert rewards == [1.001, 2.001, 3.001, 2.001]
    assert metrics == {"moerm/fallback": 0.25, "moerm/ood": 0.25, "moerm/route/math": (1 + 0.5 + 1) / 4,
                       "moerm/route/code": (1 + 0.5) / 4, "moerm/cap/logic": 1.0, "moerm/cap/style": -1.0}
    assert columns == {"moerm/domain": ["math", "code", "", "math"]}


def test_log_fields_by_hand() -> None:
    hard = {"routed_domain": "math", "route_source": "router", "fallback": False, "weights": {}, "ood": False,
            "capability_scores": {"logic": 0.5}}
    mixed = {"routed_domain": None, "route_source": "fallback", "fallback": True, "weights": {"math": 0.25,
             "code": 0.75}, "ood": True}
    assert item_fields({"system": "baseline"}) == {}
    assert item_fields(hard) == {"moerm/fallback": 0.0, "moerm/ood": 0.0, "moerm/domain": "math",
                                 "moerm/route/math": 1.0, "moerm/cap/logic": 0.5}
    assert numeric_columns([hard, mixed], ["math", "code", "chat"]) == {
        "moerm/fallback": [0.0, 1.0], "moerm/ood": [0.0, 1.0], "moerm/route/math": [1.0, 0.25],
        "moerm/route/code": [0.0, 0.75], "moerm/route/chat": [0.0, 0.0]}  # no made-up capability column
    assert batch_metrics([hard, mixed])["moerm/cap/logic"] == 0.5
    assert numeric_columns([{}, {}]) == {}
