"""Scoring (prompt, response, domain) through a reward system loaded in this process or behind `moerm serve`.

One mechanism for every trainer integration (TRL, verl): a run folder is loaded here and scored with
`system.score`; an `http(s)://` URL is scored with `POST /v1/score`, cut into requests of at most
`max_items_per_request` pairs, a 503 (loading, queue full) retried after its Retry-After, `$MOERM_API_KEY` (or
`api_key`) sent as the bearer token. Both give the same rewards for the same pairs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from moerm.serve.config import API_KEY_ENV


class RewardClient:
    """Rewards for prompt/response pairs from a run folder (loaded here) or a server's URL.

    Args:
        target: a run or saved model folder, or the URL of `moerm serve` (`http://` or `https://`).
        api_key: the server's bearer token (URL mode); None falls back to $MOERM_API_KEY.
        batch_size: the forward batch size in local mode.
        device: where the model is loaded in local mode.
        timeout: seconds per HTTP request in URL mode.
        max_items_per_request: URL mode sends at most this many pairs per request (the server's --max-items).
        retries: how many times a 503 is retried before giving up.
    """

    def __init__(self, target: str | Path, *, api_key: str | None = None, batch_size: int = 32,
                 device: str | None = None, timeout: float = 120.0, max_items_per_request: int = 256,
                 retries: int = 5):
        self.target = str(target)
        self.batch_size = batch_size
        self.max_items_per_request = max_items_per_request
        self.retries = retries
        self.remote = self.target.startswith(("http://", "https://"))
        self.system: Any = None
        self._client: httpx.Client | None = None
        if self.remote:
            api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            self._client = httpx.Client(base_url=self.target.rstrip("/"), headers=headers, timeout=timeout)
        else:
            from moerm.systems.base import load_system

            self.system = load_system(self.target, device)

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              domains: Sequence[str | None] | None = None) -> list[float | None]:
        """One reward per pair, in order (None where the server reports a non-finite reward)."""
        if len(prompts) != len(responses) or (domains is not None and len(domains) != len(prompts)):
            raise ValueError(f"got {len(prompts)} prompts, {len(responses)} responses and "
                             f"{'no' if domains is None else len(domains)} domains")
        if not self.remote:
            return [float(r) for r in self.system.score(list(prompts), list(responses),
                                                        None if domains is None else list(domains),
                                                        batch_size=self.batch_size).rewards]
        rewards: list[float | None] = []
        for s in range(0, len(prompts), self.max_items_per_request):
            items: list[dict[str, str]] = []
            for i in range(s, min(s + self.max_items_per_request, len(prompts))):
                item = {"prompt": prompts[i], "response": responses[i]}
                if domains is not None and domains[i] is not None:
                    item["domain"] = domains[i]  # type: ignore[assignment]
                items.append(item)
            rewards += self._post(items)
        return rewards

    def _post(self, items: list[dict[str, str]]) -> list[float | None]:
        """POST /v1/score; a busy or still-loading server (503) is retried after its Retry-After."""
        assert self._client is not None
        for attempt in range(self.retries + 1):
            r = self._client.post("/v1/score", json={"items": items})
            if r.status_code == 200:
                return list(r.json()["rewards"])
            if r.status_code == 503 and attempt < self.retries:
                time.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise RuntimeError(f"reward server {self.target} answered {r.status_code}: {detail}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the HTTP connection pool (URL mode)."""
        if self._client is not None:
            self._client.close()
