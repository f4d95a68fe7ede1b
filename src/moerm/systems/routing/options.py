"""Routing options, declared once: what every routed system honours (`RouterOptions`), and the two capabilities only
some have (`OODOptions`: an out-of-distribution detector; `FallbackOptions`: a general RM as the fallback). A system's
options class inherits exactly the ones it honours, so an option it would ignore is an unknown key, not a refusal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from moerm.errors import UserError
from moerm.systems.calibration import check_calibration
from moerm.systems.routing.ood import OOD_KINDS

# A router's train settings over the run's `train` (components.router.train overrides them): a linear classifier on
# (cached or tuned) prompt features learns in a few epochs at a head's learning rate.
ROUTER_DEFAULTS = {"lr": 1e-3, "head_lr": None, "epochs": 3.0, "max_steps": None}  # head_lr None: = lr
ROUTING_MODES = ("hard", "soft", "gated")
ROUTER_TUNINGS = ("frozen", "full", "lora", "trunk")
FALLBACKS = ("mixture", "general")


@dataclass
class RouterOptions:
    """Options every routed system honours (set with --set options.KEY=VALUE)."""

    # frozen: cached prompt features + linear classifier; full: fine-tune a backbone; lora: LoRA + classifier; trunk: a
    # linear classifier on the mean of the prompt's states at the output of the frozen trunk (the pretrained lower
    # blocks below the top model.trainable_layers: the trunk of `top` tuning), cheaper than the frozen router's pass
    router_tuning: str = "frozen"
    # frozen router: read the prompt's pretrained states after this many blocks (their mean; only those blocks run)
    # instead of the whole backbone's pooled output (None)
    router_layer: int | None = None
    min_confidence: float = 0.0  # below it the router's choice is not trusted: fall back (gated: mix)
    max_router_prompts_per_domain: int = 2000
    router_max_length: int = 32  # the router reads the prompt's first tokens only: domain cues sit there, and it is cheap
    # hard: the top-1 domain RM (below min_confidence: the fallback); soft: the router-probability-weighted mix of the
    # top `routing_top_k` domain RMs, renormalised over them; gated: top-1 when its probability >= min_confidence,
    # else that soft mix (a routing decision, not a fallback)
    routing: str = "hard"
    routing_top_k: int = 2  # soft/gated: how many domain RMs the mix takes (0: all of them)
    # zscore: every route's rewards mapped to mean 0, std 1 on reference pairs it did not train on (a prompt-disjoint
    # `calibration_share` of each domain's training pairs, held back), before any mix or fallback; none: raw rewards
    calibration: str = "zscore"
    calibration_share: float = 0.1

    # Keys earlier releases wrote into a saved config for options a system did not honour, with the one value they
    # allowed there: accepted (and dropped) at that value so old runs load, refused at any other.
    legacy: ClassVar[dict[str, Any]] = {}
    router_tunings: ClassVar[tuple[str, ...]] = ROUTER_TUNINGS

    @property
    def fallback(self) -> str:
        """Where a route below confidence (or out of distribution) goes; systems with `FallbackOptions` choose."""
        return "mixture"

    @property
    def ood(self) -> str:
        """The out-of-distribution detector; systems with `OODOptions` choose one."""
        return "none"

    @classmethod
    def without_legacy(cls, raw: dict[str, Any], system: str) -> dict[str, Any]:
        """`raw` options less the legacy keys at their one allowed value; any other value is a clear error."""
        out = dict(raw)
        for key, allowed in cls.legacy.items():
            if key in out:
                if allowed is not ... and out[key] != allowed:  # ...: any value was taken (and ignored)
                    raise UserError(f"{system} supports options.{key}={allowed} only (options.{key} is an option of "
                                    f"the systems that honour it); got {out[key]!r}")
                del out[key]
        return out

    def __post_init__(self) -> None:
        if self.router_tuning not in self.router_tunings:
            raise UserError(f"options.router_tuning must be {', '.join(self.router_tunings)}; got "
                            f"{self.router_tuning!r}")
        if self.router_layer is not None and (isinstance(self.router_layer, bool) or not isinstance(
                self.router_layer, int) or self.router_layer < 1):
            raise UserError(f"options.router_layer must be an integer >= 1 (or unset); got {self.router_layer!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError("options.min_confidence must be within [0, 1]")
        if self.routing not in ROUTING_MODES:
            raise UserError(f"options.routing must be hard, soft or gated; got {self.routing!r}")
        if self.routing == "gated" and self.min_confidence <= 0.0:
            raise UserError("options.routing=gated needs options.min_confidence > 0: top-1 at or above it, the top-k "
                            "mix below it")
        if isinstance(self.routing_top_k, bool) or not isinstance(self.routing_top_k, int) or self.routing_top_k < 0:
            raise UserError(f"options.routing_top_k must be an integer >= 0 (0: every domain); got {self.routing_top_k!r}")
        check_calibration(self.calibration, self.calibration_share)


@dataclass
class OODOptions(RouterOptions):
    """Out-of-distribution prompts (domains the router never saw) go to the fallback, flagged `ood: true`. entropy: the
    router's normalised entropy; knn: 1 - cosine similarity of the prompt's router features to the nearest training
    prompt; mahalanobis: squared distance to the nearest domain mean (shared covariance). The threshold flags
    `ood_quantile` of held-out in-domain prompts (of the training prompts when there are none)."""

    ood: str = "none"  # type: ignore[assignment]  # a field here, a fixed property on RouterOptions
    ood_quantile: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ood not in OOD_KINDS:
            raise UserError(f"options.ood must be one of {', '.join(OOD_KINDS)}; got {self.ood!r}")
        if not 0.0 < self.ood_quantile < 0.5:
            raise UserError("options.ood_quantile must be within (0, 0.5)")


@dataclass
class FallbackOptions(OODOptions):
    """mixture: the probability-weighted sum of the domain RMs; general: an RM trained on every domain."""

    fallback: str = "mixture"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fallback not in FALLBACKS:
            raise UserError(f"options.fallback must be 'mixture' or 'general'; got {self.fallback!r}")
