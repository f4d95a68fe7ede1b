"""Argument checks of the public Python API, in one place: `RewardSystem.score` (every system's, through
`checked_score`) and the device `load_system` is asked for.

A caller's mistake (a string where a list belongs, lists of different lengths, a domain that is not a string, a
batch size below 1, a CUDA device on a machine without one) is a `ScoreArgumentError` / `UserError` that says what
was given, never one reward per character or an IndexError deep inside a system.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from moerm.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


class ScoreArgumentError(UserError, TypeError):
    """A bad argument to `score` (a UserError, and a TypeError as Python callers expect for wrong types)."""


def _texts(value: Any, name: str) -> list[str]:
    if isinstance(value, (str, bytes)):
        raise ScoreArgumentError(f"score: {name} must be a list of strings, got a single {type(value).__name__} "
                                 f"(wrap it: [{name[:-1]}])")
    if not isinstance(value, Sequence) and not (hasattr(value, "__len__") and hasattr(value, "__iter__")):
        raise ScoreArgumentError(f"score: {name} must be a list of strings, got {type(value).__name__}")
    value = list(value)  # a tuple, a numpy array of str, a pandas Series: read once, as a list
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ScoreArgumentError(f"score: {name}[{i}] must be a string, got {type(v).__name__}")
    return value


def check_score_arguments(prompts: Any, responses: Any, domains: Any = None,
                          batch_size: Any = 32) -> tuple[list[str], list[str], list[str | None] | None]:
    """The arguments of `score` as lists, or a ScoreArgumentError naming the argument and what it was."""
    p, r = _texts(prompts, "prompts"), _texts(responses, "responses")
    if len(p) != len(r):
        raise ScoreArgumentError(f"score: {len(p)} prompts but {len(r)} responses; give one response per prompt")
    d: list[str | None] | None = None
    if domains is not None:
        if isinstance(domains, (str, bytes)) or not (hasattr(domains, "__len__") and hasattr(domains, "__iter__")):
            raise ScoreArgumentError(f"score: domains must be a list (a domain name or None per prompt), got "
                                     f"{type(domains).__name__}")
        domains = list(domains)
        if len(domains) != len(p):
            raise ScoreArgumentError(f"score: {len(p)} prompts but {len(domains)} domains; give one domain (or None) "
                                     "per prompt")
        for i, v in enumerate(domains):
            if v is not None and not isinstance(v, str):
                raise ScoreArgumentError(f"score: domains[{i}] must be a string or None, got {type(v).__name__}")
        d = list(domains)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ScoreArgumentError(f"score: batch_size must be an integer >= 1, got {batch_size!r}")
    return p, r, d


def checked_score(score: F) -> F:
    """`score` with its arguments checked first (`RewardSystem.__init_subclass__` wraps every system's)."""
    if getattr(score, "_arguments_checked", False):
        return score

    @functools.wraps(score)
    def wrapper(self: Any, prompts: Any, responses: Any, domains: Any = None, batch_size: Any = 32,
                *args: Any, **kwargs: Any) -> Any:
        p, r, d = check_score_arguments(prompts, responses, domains, batch_size)
        return score(self, p, r, d, batch_size, *args, **kwargs)

    wrapper._arguments_checked = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def check_device(device: str | torch.device | None) -> None:
    """A device this machine has: 'cuda' without CUDA (or past the GPU count) is one clear error, not a load
    failure blamed on the saved files."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {device!r} is not a device name ({e}); use e.g. 'cpu', 'cuda', 'cuda:0'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r}: CUDA is not available on this machine (this torch build or "
                            "driver sees no GPU); load on 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device {str(device)!r}: MPS is not available on this machine; load on 'cpu'")
