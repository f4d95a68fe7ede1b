"""A TRL reward function backed by a moerm reward system, in this process or behind `moerm serve`.

    from trl import GRPOConfig, GRPOTrainer
    from moerm.integrations.trl import reward_function

    reward = reward_function("runs/rodos")                   # load the run here
    reward = reward_function("http://127.0.0.1:8000")        # or score over HTTP (POST /v1/score)
    trainer = GRPOTrainer(model=..., reward_funcs=reward, args=GRPOConfig(...), train_dataset=...)

The callable has TRL's reward-function signature, `f(prompts, completions, **kwargs) -> list[float]`. Both
standard (strings) and conversational (lists of `{"role", "content"}` messages) datasets work: a conversational
completion is scored by its last assistant message; a conversational prompt is read as `moerm score` reads a plain
prompt (`moerm.integrations.conversation`): its system messages dropped, so the router and the reward model read
the user's words; one user turn as its text, several turns as an HH transcript. A dataset column named `domain`
(TRL passes columns as keyword arguments) routes each row to that domain's expert in routed systems.

What reaches TRL's logs (GRPOTrainer passes `log_metric` and `log_extra` to reward functions): for a routed system,
the batch means of `moerm.integrations.logs`'s fields (fallback and OOD rates, each route's share, DMoERM's
capability sub-scores) as metrics, and each completion's routed domain as a `moerm/domain` column of the
completions table. A busy server is retried (503, connection errors, timeouts: `RewardClient`), and a reward that
is not finite is an error, never a None that TRL would turn into NaN and average away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from moerm.integrations.client import RewardClient
from moerm.integrations.conversation import completion_text, prompt_text
from moerm.integrations.logs import PREFIX, batch_metrics, item_fields

__all__ = ["DOMAIN_COLUMN", "RewardFunction", "completion_text", "prompt_text", "reward_function"]

DOMAIN_COLUMN = "domain"


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
        self.client = RewardClient(target, api_key=api_key, batch_size=batch_size, device=device, timeout=timeout,
                                   max_items_per_request=max_items_per_request, retries=retries)
        self.target, self.remote = self.client.target, self.client.remote

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        ps = [prompt_text(p) for p in prompts]
        cs = [completion_text(c) for c in completions]
        rewards, details = self.client.score_with_details(ps, cs, _domains(kwargs.get(DOMAIN_COLUMN), len(ps)))
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        if callable(log_metric):
            for name, value in batch_metrics(details).items():
                log_metric(name, value)
        if callable(log_extra) and any(item_fields(d) for d in details):
            log_extra(f"{PREFIX}domain", [str(item_fields(d).get(f"{PREFIX}domain", "")) for d in details])
        return rewards

    def close(self) -> None:
        """Close the HTTP connection pool (remote mode)."""
        self.client.close()


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
