"""Rewards on one scale: an affine map per route (a domain RM, an adapter, a task model, the general RM) or per single
RM, fitted on reference data the route did not train on, applied before any mix or fallback.

The Bradley-Terry loss fixes neither a reward's offset nor its scale, so every separately trained route has its own
(the demo's eight domain RMs: means from -4.3 to +4.1 on the same texts). `zscore` maps each route's rewards on its
reference texts to mean 0 and standard deviation 1: r' = (r - mean) / std. A map is monotone, so it never changes
which of two replies a route prefers; it changes how routes mix (soft, gated, mixture fallback) and what a PPO/GRPO
loop, a reward clip or a rejection threshold sees across routes.

Reference data: both replies of a prompt-disjoint slice of the training pairs (`options.calibration_share` of each
domain's prompts, `data.grouping.split_by_prompt`), held back from training. Not the held-out evaluation pairs:
those are for measuring, and the map would then be fitted on the data it is judged on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from moerm.atomic import atomic_write_text
from moerm.data.schema import PreferencePair
from moerm.errors import UserError

CALIBRATIONS = ("none", "zscore")
MIN_STD = 1e-6  # a route whose rewards do not spread (a constant RM) keeps its scale: dividing would blow it up


@dataclass
class CalibrationOptions:
    """A single RM's calibration (baseline, BaseLoRA, MoRE): off by default; `zscore` holds back a prompt-disjoint
    `calibration_share` of the training pairs and maps the RM's rewards on them to mean 0, std 1, so a routed system
    (calibrated by default) and one RM give rewards on the same scale."""

    calibration: str = "none"
    calibration_share: float = 0.1

    def __post_init__(self) -> None:
        check_calibration(self.calibration, self.calibration_share)


def check_calibration(kind: str, share: float) -> None:
    if kind not in CALIBRATIONS:
        raise UserError(f"options.calibration must be {' or '.join(CALIBRATIONS)}; got {kind!r}")
    if not 0.0 < share < 0.5:
        raise UserError(f"options.calibration_share must be within (0, 0.5); got {share!r}")


@dataclass(frozen=True)
class RewardScale:
    """The mean and (sample) standard deviation of one route's raw rewards on its reference texts."""

    mean: float
    std: float
    texts: int

    @classmethod
    def of(cls, rewards: torch.Tensor) -> "RewardScale":
        r = rewards.double().flatten()
        if r.numel() < 2:
            raise UserError(f"calibration needs at least two reference rewards per route; got {r.numel()}")
        std = float(r.std(unbiased=True))
        if not math.isfinite(std) or not math.isfinite(float(r.mean())):
            raise UserError("calibration: a route's reference rewards are not finite (a diverged route?)")
        return cls(float(r.mean()), std if std > MIN_STD else 1.0, int(r.numel()))

    def apply(self, rewards: torch.Tensor) -> torch.Tensor:
        """(N,) raw -> (N,) calibrated: (r - mean) / std."""
        return (rewards.double() - self.mean).div(self.std).to(rewards.dtype)


@dataclass
class Calibration:
    """Per route, its map onto the common scale (`kind: none`: raw rewards, no maps)."""

    kind: str = "none"
    scales: dict[str, RewardScale] = field(default_factory=dict)
    reference: str = ""  # what the maps were fitted on

    def __call__(self, route: str, rewards: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return rewards
        if route not in self.scales:
            raise UserError(f"calibration has no map for route {route!r} (routes: {', '.join(self.scales)}); retrain "
                            "or set options.calibration=none")
        return self.scales[route].apply(rewards)

    def with_route(self, route: str, scale: RewardScale) -> "Calibration":
        """A copy with one more route's map (`add-domain`): the other maps are kept as they are."""
        return Calibration(self.kind, {**self.scales, route: scale}, self.reference)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reference": self.reference,
                "routes": {r: {"mean": s.mean, "std": s.std, "texts": s.texts} for r, s in self.scales.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "Calibration":
        try:
            scales = {r: RewardScale(float(v["mean"]), float(v["std"]), int(v["texts"]))
                      for r, v in dict(data.get("routes") or {}).items()}
            return cls(str(data["kind"]), scales, str(data.get("reference", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: not a readable calibration file ({type(e).__name__}: {e})") from None

    def save(self, path: Path) -> None:
        if self.kind != "none":
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        """The saved maps; a folder saved without calibration (or by an earlier release) gives raw rewards."""
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not readable JSON ({e})") from None
        return cls.from_dict(data, str(path))


def reference_texts(pairs: Sequence[PreferencePair]) -> tuple[list[str], list[str]]:
    """Both replies of every pair, as (prompts, responses): the texts a route's map is fitted on."""
    return [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]


def fit_calibration(kind: str, reference: Mapping[str, Sequence[PreferencePair]],
                    raw: Callable[[str, list[str], list[str]], torch.Tensor], source: str) -> Calibration:
    """Per route, the map of its raw rewards (`raw(route, prompts, responses)` -> (N,)) on both replies of its
    reference pairs."""
    if kind == "none":
        return Calibration()
    scales = {}
    for route, pairs in reference.items():
        if not pairs:
            raise UserError(f"calibration: route {route!r} has no reference pairs (too few prompts to hold back "
                            "a slice: add data, or set options.calibration=none)")
        scales[route] = RewardScale.of(raw(route, *reference_texts(pairs)))
    return Calibration(kind, scales, source)


def hold_back(pairs: Sequence[PreferencePair], kind: str, share: float, seed: int
              ) -> tuple[list[PreferencePair], dict[str, list[PreferencePair]]]:
    """(training pairs, reference pairs per domain): a prompt-disjoint `share` of each domain's pairs held back
    (`split_by_prompt`), at least one prompt's pairs where a domain has two prompts or more. A domain with a single
    prompt holds nothing back: its map is fitted on its training pairs, and `reference_source` says so."""
    from moerm.data.grouping import pair_keys, split_by_prompt

    if kind == "none":
        return list(pairs), {}
    reference, train = split_by_prompt(pairs, share, seed)
    held = {id(p) for p in reference}
    keys = pair_keys(pairs)
    by_domain: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_domain.setdefault(p.domain, []).append(i)
    for domain, rows in by_domain.items():
        if any(id(pairs[i]) in held for i in rows):
            continue
        prompts = sorted({keys[i] for i in rows})
        if len(prompts) >= 2:  # too few pairs for `share` to round to one: hold back one prompt (the first key)
            held.update(id(pairs[i]) for i in rows if keys[i] == prompts[0])
    train = [p for p in pairs if id(p) not in held]
    out: dict[str, list[PreferencePair]] = {}
    for domain, rows in by_domain.items():
        ref = [pairs[i] for i in rows if id(pairs[i]) in held]
        out[domain] = ref if ref else [pairs[i] for i in rows]  # one prompt: its training pairs
    return train, out


def reference_source(reference: Mapping[str, Sequence[PreferencePair]], train: Sequence[PreferencePair],
                     share: float) -> str:
    """How the maps' reference data was chosen, for `moerm info` and the saved file."""
    trained = {id(p) for p in train}
    fallback = sorted(d for d, ps in reference.items() if ps and all(id(p) in trained for p in ps))
    text = (f"both replies of a prompt-disjoint {share:.0%} of each domain's training pairs, held back from training "
            f"({sum(len(v) for v in reference.values())} pairs)")
    return text + (f"; on their training pairs (a single prompt): {', '.join(fallback)}" if fallback else "")
