"""verl custom reward functions backed by a moerm reward system, in the worker's process or behind `moerm serve`.

Written against verl 0.9.1 (its reward loop: `verl/experimental/reward_loop`, `verl/trainer/ppo/reward.py`). verl
reads the function from `reward.custom_reward_function.path` / `.name` and its default `naive` reward manager calls
it once per sample, concurrently (one asyncio task per sample; a plain function runs in a thread pool, an `async def`
on the event loop). verl imports the file by path, so settings come from environment variables (set them where
verl's reward workers start; with Ray on several nodes, in `ray_init.runtime_env.env_vars`) or from
`reward.custom_reward_function.reward_kwargs` (`moerm_url`, `moerm_run`, `moerm_device`, `moerm_domain`), which win:

    MOERM_URL=http://RM_HOST:8000        # score over HTTP (POST /v1/score) ...
    MOERM_RUN=runs/rodos                 # ... or load the run in the reward worker (exactly one of the two)
    MOERM_DEVICE=cuda                    # local mode: where the run is loaded (default: the system's)
    MOERM_API_KEY=...                    # URL mode: the server's bearer token
    MOERM_DOMAIN=extra_info              # where the domain comes from: extra_info (default) | data_source | router
    MOERM_MAX_WAIT_MS=10                 # how long a sample waits for others to join its request

    reward.custom_reward_function.path=$(python -c "import moerm.integrations.verl as m; print(m.__file__)")
    reward.custom_reward_function.name=compute_score_async      # or compute_score (a plain function)

(verl 0.9.1 no longer reads the top-level `custom_reward_function.*` nor `reward_model.reward_manager=batch` of
older releases: with them verl scores with its rule-based default and never calls moerm.)

Functions:
    compute_score_async(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict  (async)
    compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict
        per sample, as the naive (and remote) manager calls them. Concurrent calls are gathered by
        `RewardClient.submit` into one request (one `system.score` call locally) per `max_wait_ms`, so a batch of
        samples costs one HTTP round trip, not one per sample.
    compute_score(data_sources=, solution_strs=, ground_truths=, extra_infos=, **kwargs) -> list[dict]
    compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list[dict]
        the batched form, for verl's legacy BatchRewardManager.
Each result is `{"score": reward, **fields}`, the fields of `moerm.integrations.logs` (route weights, fallback and
OOD flags, DMoERM sub-scores, the routed domain as text): verl keeps them as `reward_extra_info`, dumps them with the
generations and averages the numeric ones in its validation metrics. `fields=False` in reward_kwargs returns the
bare float.

The pair scored: the response is verl's `solution_str` (decoded without special tokens); the prompt is
`extra_info["prompt"]`, else `extra_info["question"]` (verl's example preprocessors store the raw question there),
a string or a list of chat messages (read as `moerm.integrations.conversation.conversation_prompt` reads them:
system messages dropped). An item without either is an error: add the prompt to `extra_info` in the dataset.
The domain: `extra_info["domain"]` when present, else (MOERM_DOMAIN=data_source) verl's `data_source`, else none
and a routed system routes by its router. `ground_truth` is not used: a reward model needs no reference answer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any

from moerm.errors import UserError
from moerm.integrations.client import RewardClient
from moerm.integrations.conversation import prompt_text
from moerm.integrations.logs import item_fields

PROMPT_KEYS = ("prompt", "question")
DOMAIN_KEY = "domain"
DOMAIN_SOURCES = ("extra_info", "data_source", "router")
_CLIENTS: dict[tuple[str, str | None, float], RewardClient] = {}  # one per target and device, for the worker's lifetime


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
    wait = float(_setting(kwargs, "max_wait_ms") or 10.0)
    key = (str(target), device, wait)
    if key not in _CLIENTS:
        _CLIENTS[key] = RewardClient(str(target), device=device, max_wait_ms=wait)
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


def _source(kwargs: Mapping[str, Any]) -> str:
    source = _setting(kwargs, "domain") or "extra_info"
    if source not in DOMAIN_SOURCES:
        raise UserError(f"MOERM_DOMAIN must be one of {', '.join(DOMAIN_SOURCES)}; got {source!r}")
    return source


def _result(reward: float, details: Mapping[str, Any], kwargs: Mapping[str, Any]) -> float | dict[str, Any]:
    """What verl gets for one sample: {"score": reward, **log fields}, or the bare float with fields=False."""
    if kwargs.get("fields") is False or str(kwargs.get("fields", "")).lower() == "false":
        return float(reward)
    return {"score": float(reward), **item_fields(details)}


def _submit(data_source: Any, solution_str: Any, extra_info: Any, kwargs: Mapping[str, Any]):
    """One sample into the shared client's request batcher (see `RewardClient.submit`)."""
    source = _source(kwargs)
    return _client(kwargs).submit(item_prompt(extra_info), str(solution_str),
                                  item_domain(data_source, extra_info, source))


async def compute_score_async(data_source: Any = None, solution_str: str | None = None, ground_truth: Any = None,
                              extra_info: Any = None, **kwargs: Any) -> float | dict[str, Any]:
    """verl's async per-sample reward (the reward loop awaits it on its event loop): the sample joins the request
    that concurrent samples are gathered into, and the loop stays free while it is scored."""
    if solution_str is None:
        raise TypeError("compute_score_async needs solution_str")
    reward, details = await asyncio.wrap_future(_submit(data_source, solution_str, extra_info, kwargs))
    return _result(reward, details, kwargs)


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any], **kwargs: Any) -> list[float | dict[str, Any]]:
    """verl's batched custom reward (legacy BatchRewardManager): one result per item, one scoring call."""
    n = len(solution_strs)
    if len(data_sources) != n or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError(f"got {len(data_sources)} data_sources, {n} solution_strs and "
                         f"{'no' if extra_infos is None else len(extra_infos)} extra_infos")
    source = _source(kwargs)
    infos = list(extra_infos) if extra_infos is not None else [None] * n
    prompts = [item_prompt(info, i) for i, info in enumerate(infos)]
    domains = [item_domain(ds, info, source) for ds, info in zip(data_sources, infos)]
    rewards, details = _client(kwargs).score_with_details(prompts, [str(s) for s in solution_strs],
                                                          domains if any(d is not None for d in domains) else None)
    return [_result(r, d, kwargs) for r, d in zip(rewards, details)]


def compute_score(data_source: Any = None, solution_str: str | None = None, ground_truth: Any = None,
                  extra_info: Any = None, *, data_sources: Sequence[Any] | None = None,
                  solution_strs: Sequence[str] | None = None, ground_truths: Sequence[Any] | None = None,
                  extra_infos: Sequence[Any] | None = None, **kwargs: Any) -> float | dict[str, Any] | list[Any]:
    """verl's custom reward function, either form: per sample (`data_source, solution_str, ground_truth,
    extra_info`; concurrent calls share one request) or batched (`data_sources=, solution_strs=, ground_truths=,
    extra_infos=`) -> list."""
    if solution_strs is not None:
        return compute_score_batch(data_sources if data_sources is not None else [None] * len(solution_strs),
                                   solution_strs, ground_truths if ground_truths is not None else [],
                                   extra_infos, **kwargs)
    if solution_str is None:
        raise TypeError("compute_score needs solution_str (per sample) or solution_strs (batched)")
    reward, details = _submit(data_source, solution_str, extra_info, kwargs).result()
    return _result(reward, details, kwargs)
