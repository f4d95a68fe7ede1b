"""A TRL reward function backed by a moerm reward system, in this process or behind `moerm serve`.

    from trl import GRPOConfig, GRPOTrainer
    from moerm.integrations.trl import reward_function

    reward = reward_function("runs/rodos")                   # load the run here
    reward = reward_function("http://127.0.0.1:8000")        # or score over HTTP (POST /v1/score)
    trainer = GRPOTrainer(model=..., reward_funcs=reward, args=GRPOConfig(...), train_dataset=...)

The callable has TRL's reward-function signature, `f(prompts, completions, **kwargs) -> list[float]`. Both
standard (strings) and conversational (lists of `{"role", "content"}` messages) datasets work: a conversational
completion is scored by its last assistant message, a conversational prompt by its messages' contents joined with a
blank line. A dataset column named `domain` (TRL passes columns as keyword arguments) routes each row to that
domain's expert in routed systems.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import httpx

from moerm.serve.config import API_KEY_ENV

DOMAIN_COLUMN = "domain"


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def prompt_text(prompt: Any) -> str:
    """A TRL prompt as one string: itself, or a conversation's message contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return _content_text(prompt.get("content"))
    if isinstance(prompt, (list, tuple)):
        return "\n\n".join(t for t in (_content_text(m.get("content")) if isinstance(m, dict) else str(m)
                                       for m in prompt) if t)
    raise TypeError(f"a prompt must be a string or a list of messages; got {type(prompt).__name__}")


def completion_text(completion: Any) -> str:
    """A TRL completion as one string: itself, or the content of the conversation's last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        last = (assistant or messages or [{}])[-1]
        return _content_text(last.get("content"))
    raise TypeError(f"a completion must be a string or a list of messages; got {type(completion).__name__}")


def _domains(column: Any, n: int) -> list[str | None] | None:
    """The dataset's `domain` column, when TRL passed one of the right length."""
    if not isinstance(column, (list, tuple)) or len(column) != n:
        return None
    return [d if isinstance(d, str) and d else None for d in column]


class RewardFunction:
    """Callable with TRL's reward-function signature; see `reward_function`."""

    def __init__(self, target: str | Path, *, api_key: str | None = None, batch_size: int = 32,
                 device: str | None = None, timeout: float = 120.0, max_items_per_request: int = 256,
                 retries: int = 5, name: str = "moerm_reward"):
        self.__name__ = name  # TRL logs each reward function under its __name__
        self.target = str(target)
        self.batch_size = batch_size
        self.max_items_per_request = max_items_per_request
        self.retries = retries
        self.remote = self.target.startswith(("http://", "https://"))
        self._system: Any = None
        self._client: httpx.Client | None = None
        if self.remote:
            api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            self._client = httpx.Client(base_url=self.target.rstrip("/"), headers=headers, timeout=timeout)
        else:
            from moerm.systems.base import load_system

            self._system = load_system(self.target, device)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        ps = [prompt_text(p) for p in prompts]
        cs = [completion_text(c) for c in completions]
        domains = _domains(kwargs.get(DOMAIN_COLUMN), len(ps))
        if not self.remote:
            return list(self._system.score(ps, cs, domains, batch_size=self.batch_size).rewards)
        rewards: list[float] = []
        for s in range(0, len(ps), self.max_items_per_request):
            items: list[dict[str, str]] = []
            for i in range(s, min(s + self.max_items_per_request, len(ps))):
                item = {"prompt": ps[i], "response": cs[i]}
                if domains is not None and domains[i] is not None:
                    item["domain"] = domains[i]
                items.append(item)
            rewards += self._post(items)
        return rewards

    def _post(self, items: list[dict[str, str]]) -> list[float]:
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
        """Close the HTTP connection pool (remote mode)."""
        if self._client is not None:
            self._client.close()


def reward_function(run_dir_or_url: str | Path, *, api_key: str | None = None, batch_size: int = 32,
                    device: str | None = None, timeout: float = 120.0, max_items_per_request: int = 256,
                    name: str = "moerm_reward") -> RewardFunction:
    """A TRL reward function (`f(prompts, completions, **kwargs) -> list[float]`), e.g. for GRPOTrainer.

    Args:
        run_dir_or_url: a run or saved model folder (loaded in this process), or the URL of `moerm serve`.
        api_key: the server's bearer token (URL mode); None falls back to $MOERM_API_KEY.
        batch_size: the forward batch size in local mode.
        device: where the model is loaded in local mode.
        timeout: seconds per HTTP request in URL mode.
        max_items_per_request: URL mode sends at most this many pairs per request (the server's --max-items).
        name: the function's `__name__`, which TRL uses to label its reward logs.
    """
    return RewardFunction(run_dir_or_url, api_key=api_key, batch_size=batch_size, device=device, timeout=timeout,
                          max_items_per_request=max_items_per_request, name=name)
