"""A verl custom reward function backed by a moerm reward system, in the worker's process or behind `moerm serve`.

verl imports the function by file path, so it is configured by environment variables (set them where verl's reward
workers start; with Ray on several nodes, in `ray_init.runtime_env.env_vars` or the cluster's environment):

    MOERM_URL=http://RM_HOST:8000        # score over HTTP (POST /v1/score) ...
    MOERM_RUN=runs/rodos                 # ... or load the run in the reward worker (exactly one of the two)
    MOERM_DEVICE=cuda                    # local mode: where the run is loaded (default: the system's)
    MOERM_API_KEY=...                    # URL mode: the server's bearer token
    MOERM_DOMAIN=extra_info              # where the domain comes from: extra_info (default) | data_source | router

    # verl config: the batched form with the batch reward manager (one request per batch) ...
    reward_model.reward_manager=batch
    custom_reward_function.path=$(python -c "import moerm.integrations.verl as m; print(m.__file__)")
    custom_reward_function.name=compute_score
    # ... or the per-item form with the naive manager (same function, one pair per call)

`compute_score` has both of verl's signatures, told apart by their keyword names as verl's managers pass them:
`compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float` (NaiveRewardManager)
and `compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **kwargs) -> list[float]`
(BatchRewardManager); `compute_score_batch` is the batched form alone.

The pair scored: the response is verl's `solution_str` (decoded without special tokens); the prompt is
`extra_info["prompt"]`, else `extra_info["question"]` (verl's example preprocessors store the raw question there),
a string or a list of chat messages (read as `moerm.integrations.conversation.conversation_prompt` reads them:
system messages dropped). An item without either is an error: add the prompt to `extra_info` in the dataset.
The domain: `extra_info["domain"]` when present, else (MOERM_DOMAIN=data_source) verl's `data_source`, else none
and a routed system routes by its router. `ground_truth` is not used: a reward model needs no reference answer.
Settings can also come as `custom_reward_function.reward_kwargs` (`moerm_url`, `moerm_run`, `moerm_device`,
`moerm_domain`), which win over the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from moerm.errors import UserError
from moerm.integrations.client import RewardClient
from moerm.integrations.conversation import prompt_text

PROMPT_KEYS = ("prompt", "question")
DOMAIN_KEY = "domain"
DOMAIN_SOURCES = ("extra_info", "data_source", "router")
_CLIENTS: dict[tuple[str, str | None], RewardClient] = {}  # one per target and device, for the worker's lifetime


def _setting(kwargs: Mapping[str, Any], name: str) -> str | None:
    value = kwargs.get(f"moerm_{name}")
    if value is None:
        value = os.environ.get(f"MOERM_{name.upper()}")
    return str(value) if value not in (None, "") else None


def _client(kwargs: Mapping[str, Any]) -> RewardClient:
    """The reward client the settings name (created on first use, then reused)."""
    url, run = _setting(kwargs, "url"), _setting(kwargs, "run")
    if (url is None) == (run is None):
        raise UserError("moerm's verl reward function needs exactly one of MOERM_URL (a `moerm serve` URL) or "
                        f"MOERM_RUN (a run folder) in the reward worker's environment; got "
                        f"{'both' if url else 'neither'}")
    target = url if url is not None else run
    device = None if url is not None else _setting(kwargs, "device")
    key = (str(target), device)
    if key not in _CLIENTS:
        _CLIENTS[key] = RewardClient(str(target), device=device)
    return _CLIENTS[key]


def item_prompt(extra_info: Any, index: int = 0) -> str:
    """The prompt of one verl item: `extra_info["prompt"]`, else `extra_info["question"]` (a string or messages)."""
    if isinstance(extra_info, Mapping):
        for key in PROMPT_KEYS:
            value = extra_info.get(key)
            if value is not None and not (hasattr(value, "__len__") and len(value) == 0):
                if hasattr(value, "tolist"):  # a numpy array of messages, as verl's non_tensor_batch holds them
                    value = value.tolist()
                return prompt_text(value)
    keys = sorted(extra_info) if isinstance(extra_info, Mapping) else None
    raise UserError(f"verl item {index}: no prompt in extra_info (looked for {' or '.join(PROMPT_KEYS)}; it has "
                    f"{keys if keys is not None else type(extra_info).__name__}); a reward model scores a prompt and "
                    "its response: store the prompt as extra_info['prompt'] in your dataset preprocessing")


def item_domain(data_source: Any, extra_info: Any, source: str) -> str | None:
    """The domain of one verl item under MOERM_DOMAIN `source` (see the module docstring)."""
    if source == "router":
        return None
    given = extra_info.get(DOMAIN_KEY) if isinstance(extra_info, Mapping) else None
    if isinstance(given, str) and given:
        return given
    if source == "data_source" and isinstance(data_source, str) and data_source:
        return data_source
    return None


def _rewards(values: Sequence[float | None]) -> list[float]:
    """verl expects floats: a reward the server reported as non-finite (null) is NaN."""
    return [math.nan if v is None else float(v) for v in values]


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any], **kwargs: Any) -> list[float]:
    """verl's batched custom reward (BatchRewardManager): one reward per item, one scoring call for the batch."""
    n = len(solution_strs)
    if len(data_sources) != n or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError(f"got {len(data_sources)} data_sources, {n} solution_strs and "
                         f"{'no' if extra_infos is None else len(extra_infos)} extra_infos")
    source = _setting(kwargs, "domain") or "extra_info"
    if source not in DOMAIN_SOURCES:
        raise UserError(f"MOERM_DOMAIN must be one of {', '.join(DOMAIN_SOURCES)}; got {source!r}")
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    prompts = [item_prompt(info, i) for i, info in enumerate(infos)]
    domains = [item_domain(ds, info, source) for ds, info in zip(data_sources, infos)]
    return _rewards(_client(kwargs).score(prompts, [str(s) for s in solution_strs],
                                          domains if any(d is not None for d in domains) else None))


def compute_score(data_source: Any = None, solution_str: str | None = None, ground_truth: Any = None,
                  extra_info: Any = None, *, data_sources: Sequence[Any] | None = None,
                  solution_strs: Sequence[str] | None = None, ground_truths: Sequence[Any] | None = None,
                  extra_infos: Sequence[Any] | None = None, **kwargs: Any) -> float | list[float]:
    """verl's custom reward function, either form: per item (`data_source, solution_str, ground_truth,
    extra_info`) -> float, or batched (`data_sources=, solution_strs=, ground_truths=, extra_infos=`) -> list."""
    if solution_strs is not None:
        return compute_score_batch(data_sources if data_sources is not None else [None] * len(solution_strs),
                                   solution_strs, ground_truths if ground_truths is not None else [],
                                   extra_infos, **kwargs)
    if solution_str is None:
        raise TypeError("compute_score needs solution_str (per item) or solution_strs (batched)")
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]
