"""Routing, in one place, for every routed system (RODOS, ARLISS, DMoERM):

- `options`: the routing options, declared once (`RouterOptions`, plus `OODOptions` / `FallbackOptions` for the
  systems that honour them);
- `backends` + `router`: `Router`, a classifier over prompts on one interchangeable feature backend;
- `decisions`: routes from router probabilities (hard, soft, gated; the fallback) and the one way rewards combine;
- `ood`: the out-of-distribution detector;
- `store`: domain names, router prompts and `RouterStore` (versioned router files and the index switch that
  `add-domain` uses).
The router's classification dataset, step and evaluation sit in `moerm.train.classification`.
"""

from moerm.systems.routing.backends import (
    CachedPooled, EarlyLayers, RouterBackend, SharedAdapter, TrunkStates, TunedBackbone,
)
from moerm.systems.routing.decisions import Route, combine_rewards, decide_routes, rm_passes, top_k_weights
from moerm.systems.routing.features import early_features, prompt_features, prompt_outputs
from moerm.systems.routing.ood import OOD_FILES, OOD_KINDS, OODCheck, OODDetector
from moerm.systems.routing.options import (
    ROUTER_DEFAULTS, ROUTER_TUNINGS, ROUTING_MODES, FallbackOptions, OODOptions, RouterOptions,
)
from moerm.systems.routing.router import Router, backbone_tuning, own_backend
from moerm.systems.routing.store import (
    ROUTER_PROMPTS, RouterLayout, RouterPaths, RouterStore, domain_dir, load_router_examples, new_domain_of,
    require_routes, router_examples, safe_name, save_router_examples,
)

__all__ = [
    "CachedPooled", "EarlyLayers", "RouterBackend", "SharedAdapter", "TrunkStates", "TunedBackbone", "Route",
    "combine_rewards", "decide_routes", "rm_passes", "top_k_weights", "early_features", "prompt_features",
    "prompt_outputs", "OOD_FILES", "OOD_KINDS", "OODCheck", "OODDetector", "ROUTER_DEFAULTS", "ROUTER_TUNINGS",
    "ROUTING_MODES", "FallbackOptions", "OODOptions", "RouterOptions", "Router", "backbone_tuning", "own_backend",
    "ROUTER_PROMPTS", "RouterLayout", "RouterPaths", "RouterStore", "domain_dir", "load_router_examples",
    "new_domain_of", "require_routes", "router_examples", "safe_name", "save_router_examples",
]
