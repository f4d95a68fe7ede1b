"""Scoring (prompt, response, domain) through a reward system loaded in this process or behind `moerm serve`.

One mechanism for every trainer integration (TRL, verl): a run folder is loaded here and scored with
`system.score`; an `http(s)://` URL is scored with `POST /v1/score`, cut into requests of at most
`max_items_per_request` pairs, `$MOERM_API_KEY` (or `api_key`) sent as the bearer token. Both give the same rewards
(and the same per-item details: route, fallback, sub-scores) for the same pairs.

A busy cluster is survived, not crashed on: a 503 (loading, queue full) is retried after its Retry-After, and a
connection error or timeout (server restarting, network blip) after an exponential backoff (`backoff_s`, doubled
per try up to `max_backoff_s`), `retries` times in all. Anything else (a 4xx: a wrong query, an unscorable pair) is
raised at once with the server's message. A reward that is not finite is an error (`RewardError`), never a silent
None that a trainer would average away.

`submit` scores one pair asynchronously: pairs submitted from several threads or coroutines within `max_wait_ms`
of each other go out as one request (one `system.score` call locally), which is how verl's per-sample reward calls
(run concurrently by its reward loop) become one request per batch.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from moerm.serve.config import API_KEY_ENV

Scored = tuple[float, dict[str, Any]]  # (reward, details) of one pair


class RewardError(RuntimeError):
    """The reward server (or the local system) could not give a finite reward for a pair."""


class RewardClient:
    """Rewards for prompt/response pairs from a run folder (loaded here) or a server's URL.

    Args:
        target: a run or saved model folder, or the URL of `moerm serve` (`http://` or `https://`).
        api_key: the server's bearer token (URL mode); None falls back to $MOERM_API_KEY.
        batch_size: the forward batch size in local mode.
        device: where the model is loaded in local mode.
        timeout: seconds per HTTP request in URL mode.
        max_items_per_request: URL mode sends at most this many pairs per request (the server's --max-items).
        retries: how many times a 503, a connection error or a timeout is retried before giving up.
        backoff_s, max_backoff_s: the first wait after a connection error or timeout, doubled per try up to the max.
        max_wait_ms: how long `submit` waits for more pairs to join a request.
    """

    def __init__(self, target: str | Path, *, api_key: str | None = None, batch_size: int = 32,
                 device: str | None = None, timeout: float = 120.0, max_items_per_request: int = 256,
                 retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0, max_wait_ms: float = 10.0):
        self.target = str(target)
        self.batch_size = batch_size
        self.max_items_per_request = max_items_per_request
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.max_wait_ms = max_wait_ms
        self.remote = self.target.startswith(("http://", "https://"))
        self.system: Any = None
        self._client: httpx.Client | None = None
        self._pending: list[tuple[str, str, str | None, Future[Scored]]] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None
        if self.remote:
            api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            self._client = httpx.Client(base_url=self.target.rstrip("/"), headers=headers, timeout=timeout)
        else:
            from moerm.systems.base import load_system

            self.system = load_system(self.target, device)

    # ------------------------------------------------------------------------------------------- batched

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              domains: Sequence[str | None] | None = None) -> list[float]:
        """One reward per pair, in order."""
        return self.score_with_details(prompts, responses, domains)[0]

    def score_with_details(self, prompts: Sequence[str], responses: Sequence[str],
                           domains: Sequence[str | None] | None = None) -> tuple[list[float], list[dict[str, Any]]]:
        """Rewards and the system's per-pair details (route, fallback, sub-scores), in order.

        Raises:
            RewardError: a reward is not finite (the server reports it as null).
        """
        if len(prompts) != len(responses) or (domains is not None and len(domains) != len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses and "
                             f"{'no' if domains is None else len(domains)} domains")
        if not self.remote:
            out = self.system.score(list(prompts), list(responses), None if domains is None else list(domains),
                                    batch_size=self.batch_size)
            rewards: list[float | None] = [float(r) for r in out.rewards]
            details = [dict(d) for d in out.details]
        else:
            rewards, details = [], []
            for s in range(0, len(prompts), self.max_items_per_request):
                items: list[dict[str, str]] = []
                for i in range(s, min(s + self.max_items_per_request, len(prompts))):
                    item = {"prompt": prompts[i], "response": responses[i]}
                    if domains is not None and domains[i] is not None:
                        item["domain"] = domains[i]  # type: ignore[assignment]
                    items.append(item)
                body = self._post(items)
                rewards += body["rewards"]
                details += body.get("details") or [{} for _ in items]
        bad = [i for i, r in enumerate(rewards) if r is None or not math.isfinite(r)]
        if bad:
            raise RewardError(f"reward system {self.target} gave no finite reward for item {bad[0]} "
                              f"({len(bad)} of {len(rewards)} items); prompt starts {prompts[bad[0]][:60]!r}")
        return [float(r) for r in rewards], details  # type: ignore[arg-type]

    def _post(self, items: list[dict[str, str]]) -> dict[str, Any]:
        """POST /v1/score; a 503 is retried after its Retry-After, a connection error or timeout after a backoff."""
        assert self._client is not None
        wait = self.backoff_s
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self._client.post("/v1/score", json={"items": items})
            except httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                if last:
                    raise RewardError(f"reward server {self.target} unreachable after {self.retries + 1} tries: "
                                      f"{type(e).__name__}: {e}") from e
                time.sleep(wait)
                wait = min(wait * 2, self.max_backoff_s)
                continue
            if r.status_code == 200:
                return dict(r.json())
            if r.status_code == 503 and not last:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise RewardError(f"reward server {self.target} answered {r.status_code}: {detail}")
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------ per pair

    def submit(self, prompt: str, response: str, domain: str | None = None) -> Future[Scored]:
        """Score one pair together with the pairs other threads submit meanwhile; the future holds
        (reward, details), or the error the whole request failed with."""
        future: Future[Scored] = Future()
        with self._cond:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._drain, name="moerm-reward-client", daemon=True)
                self._worker.start()
            self._pending.append((prompt, response, domain, future))
            self._cond.notify_all()
        return future

    def _drain(self) -> None:
        """The worker: wait for a pair, let others join for max_wait_ms (or until a request is full), score them."""
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while len(self._pending) < self.max_items_per_request:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[:self.max_items_per_request]
                del self._pending[:len(batch)]
            domains = [d for _, _, d, _ in batch]
            try:
                rewards, details = self.score_with_details([p for p, _, _, _ in batch], [r for _, r, _, _ in batch],
                                                           domains if any(d is not None for d in domains) else None)
            except BaseException as e:  # noqa: BLE001 - handed to every caller of this request
                for *_, f in batch:
                    f.set_exception(e)
                continue
            for (*_, f), reward, det in zip(batch, rewards, details):
                f.set_result((reward, det))

    def close(self) -> None:
        """Close the HTTP connection pool (URL mode)."""
        if self._client is not None:
            self._client.close()
