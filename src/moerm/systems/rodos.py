"""RODOS (Namgoong et al. 2024): an external router picks one of several domain-specific reward models.

Each domain RM is a full `baseline` RM trained only on its domain's pairs; the router is a separate sequence
classifier over the prompt. A new domain means one new RM and a retrained router (`add_domain`), nothing else.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from moerm.config import RunConfig
from moerm.errors import UserError
from moerm.encoding import make_encoder
from moerm.encoding.tuning import share_trunk
from moerm.data.grouping import pair_keys
from moerm.data.schema import PreferencePair
from moerm.systems.base import SYSTEM_FILE, FitContext, FitResult, RewardSystem, ScoreOutput, load_system, register
from moerm.systems.baseline import BaselineSystem
from moerm.systems.components import ComponentFit
from moerm.systems.routing import (
    ROUTER_DEFAULTS, FallbackOptions, Router, RouterPaths, RouterStore, combine_rewards, domain_dir,
    load_router_examples, new_domain_of, require_routes, router_examples,
)
from moerm.systems.calibration import Calibration, fit_calibration, hold_back, reference_source
from moerm.systems.routing.selection import SelectionRule, select_route

RODOS_FILE = "rodos.json"
GENERAL_DIR = "general_rm"  # the general fallback RM (options.fallback=general), beside rms/, never a domain name
CONFIDENCE_GRID = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # options.tune_confidence's candidates
GENERAL = "rm/general"  # its route's name in the calibration maps (no domain name holds a "/")
FROZEN_ROUTER_LAYER = 1  # options.router_layer's "auto" for the frozen router


@dataclass
class RODOSOptions(FallbackOptions):
    """Router options; the domain RMs use the run's model config (tuning auto = full) and `components.rm.train`.

    Routing defaults to `gated`: the top-1 domain RM when the router is at least 60% sure, else the probability-
    weighted mix of the top 2. On the demo's domain RMs it gained 2.3 points macro over the paper's hard top-1 at 17%
    more RM passes (docs/RESULTS.md, benchmarks/routing_variants.py). The paper's top-1 is `routing: hard` with
    `min_confidence: 0`; `hard` at the default 0.6 sends a prompt the router is less sure of to the fallback (the mix
    of every domain RM, one pass each, or the general RM with `fallback: general`).
    """

    routing: str = "gated"
    min_confidence: float = 0.6
    # the frozen router reads the prompt's pretrained states after this many blocks (only they run); "auto": 1 for
    # the frozen router, unset for the others. On the demo's RODOS the 1-block router routes 84.2% of held-out
    # prompts right, the whole backbone's pooled output 74.8%, for the same reward accuracy (-0.6 [-3.4, +1.9] macro)
    # at a quarter of the router's cost (docs/RESULTS.md). Runs saved before read the whole backbone: they load so.
    router_layer: int | str | None = "auto"  # type: ignore[assignment]
    # with fallback=general: per domain, hand its route to the general RM only where that RM beats the domain RM on
    # the domain's held-back prompt-disjoint pairs (the calibration slice) with evidence: at least
    # `select_min_prompts` prompts and the paired interval at `select_level` above 0 (`routing.selection`)
    select_routes: bool = False
    select_min_prompts: int = 10
    select_level: float = 0.9
    # choose options.min_confidence on the held-back prompt-disjoint slice: the grid value whose own-router routing
    # scores the best macro accuracy there (ties: the lower one), used at inference and saved in the index
    tune_confidence: bool = False

    def __post_init__(self) -> None:
        if self.router_layer == "auto":
            self.router_layer = FROZEN_ROUTER_LAYER if self.router_tuning == "frozen" else None
        super().__post_init__()
        if self.select_routes and self.fallback != "general":
            raise UserError("options.select_routes compares each domain RM with the general RM: it needs "
                            "options.fallback=general")
        if not isinstance(self.select_min_prompts, int) or isinstance(self.select_min_prompts, bool) \
                or self.select_min_prompts < 2:
            raise UserError(f"options.select_min_prompts must be a whole number >= 2; got {self.select_min_prompts!r}")
        if not isinstance(self.select_level, (int, float)) or not 0 < self.select_level < 1:
            raise UserError(f"options.select_level must be within (0, 1); got {self.select_level!r}")


@register
class RODOSSystem(RewardSystem):
    """Router + one full RM per domain; a batch is grouped by routed domain, one sub-batch per RM."""

    name = "rodos"
    options_class = RODOSOptions
    routed = True
    component_defaults = {"rm": {}, "router": ROUTER_DEFAULTS}

    def __init__(self, config: RunConfig, rms: dict[str, BaselineSystem] | None = None, router: Router | None = None):
        super().__init__(config)
        self.opts: RODOSOptions = self.options
        if "router_layer" not in self.config.options:  # saved with the run: what "auto" meant when it trained
            self.config = dataclasses.replace(self.config, options={**self.config.options,
                                                                    "router_layer": self.opts.router_layer})
        make_encoder(self.config.model.backbone, self.opts.router_max_length)  # a too-long router_max_length fails now
        self.rms: dict[str, BaselineSystem] = dict(rms or {})
        self.general: BaselineSystem | None = None  # options.fallback=general: one RM trained on every domain
        self.router = router
        self.router_examples: list[tuple[str, str]] = []
        self.router_version = 0  # which RouterStore version the saved folder uses (add-domain moves it on)
        self.calibration = Calibration()  # each route's map onto the common scale (options.calibration)
        self.selection: dict[str, dict[str, Any]] = {}  # options.select_routes: per domain, who serves its route
        self.tuned: dict[str, Any] = {}  # options.tune_confidence: the chosen min_confidence and its evidence

    @property
    def domains(self) -> list[str]:
        return sorted(self.rms)

    def _rm_config(self) -> RunConfig:
        """Each domain RM is a baseline with the run's model config and the `rm` component's train settings."""
        return dataclasses.replace(self.config, system="baseline", options={}, components={},
                                   train=self.train_config("rm"))

    def _train_rm(self, domain: str | None, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None,
                  ctx: FitContext) -> tuple[BaselineSystem, FitResult]:
        """One domain's RM on that domain's pairs; `domain=None` trains the general fallback RM on all of them."""
        rm = BaselineSystem(self._rm_config())
        folder = f"rm-{domain_dir(domain)}" if domain is not None else GENERAL_DIR
        sub = FitContext(ctx.out_dir / "components" / folder, ctx.resume, ctx.progress, ctx.stop_after_steps)
        keep = (lambda p: True) if domain is None else (lambda p: p.domain == domain)
        result = rm.fit([p for p in train if keep(p)], [p for p in eval if keep(p)] if eval else None, sub)
        return rm, result

    def _train_router(self, ctx: FitContext, eval: Sequence[PreferencePair] | None = None,
                      calibration: Sequence[PreferencePair] = ()) -> ComponentFit:
        self.router = Router(self.config, self.opts, self.domains)
        cap = self.opts.max_router_prompts_per_domain
        held_out = router_examples(eval, cap) if eval else []
        return self.router.fit(self.router_examples, ctx.out_dir / "components" / "router", ctx,
                               self.train_config("router"), held_out, router_examples(calibration, cap))

    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        require_routes([p.domain for p in train], self.name)
        o = self.opts
        held = "zscore" if (o.select_routes or o.tune_confidence or o.ood != "none") else o.calibration  # one slice
        train, reference = hold_back(train, held, o.calibration_share, self.config.train.seed)
        result = FitResult({})
        for domain in sorted({p.domain for p in train}):
            self.rms[domain], sub = self._train_rm(domain, train, eval, ctx)
            # each RM on its own domain's held-out pairs (oracle routing); `moerm eval` measures the routed system
            result.merge(sub, f"rm:{domain}")
        if self.opts.fallback == "general":
            self.general, sub = self._train_rm(None, train, None, ctx)
            result.merge(sub, "rm:general")
        routes = dict(reference)
        if self.general is not None:  # the general RM's reference: every domain's
            routes[GENERAL] = [p for ps in reference.values() for p in ps]
        with self.reusing_route_rewards():  # calibration, selection and tuning read the same held-back texts
            self.calibration = fit_calibration(o.calibration, routes, self._raw,
                                               reference_source(reference, train, o.calibration_share))
            if o.select_routes:
                self.select_routes(reference, train)
            self.router_examples = router_examples(train, self.opts.max_router_prompts_per_domain)
            trained = {id(p) for p in train}
            held = [p for ps in reference.values() for p in ps if id(p) not in trained]  # the OOD threshold's prompts
            result.add(self._train_router(ctx, eval, held), "router")  # router:eval_accuracy on held-out prompts only
            self._share_trunks()
            if o.tune_confidence:
                self._tune_confidence([p for ps in reference.values() for p in ps], train)
        return result

    @contextmanager
    def reusing_route_rewards(self) -> Iterator[None]:
        """While active, each route scores each (prompt, response) once: a route's reward for a text does not
        depend on the routing, so trying several routings (the confidence grid, an ablation) on the same texts costs
        one pass per route and text. The routes' weights must not change meanwhile."""
        raw = self._raw
        seen: dict[tuple[str, str, str], float] = {}

        def once(route: str, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
            keys = [(route, p, r) for p, r in zip(prompts, responses)]
            todo = list(dict.fromkeys(k for k in keys if k not in seen))
            if todo:
                out = raw(route, [k[1] for k in todo], [k[2] for k in todo], batch_size)  # (len(todo),)
                seen.update(zip(todo, out.tolist()))
            return torch.tensor([seen[k] for k in keys])  # (N,)

        self._raw = once  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self._raw  # the method again

    def _tune_confidence(self, held: list[PreferencePair], train: Sequence[PreferencePair]) -> None:
        """options.min_confidence: the grid value with the best macro accuracy of the routed system (own router) on
        the held-back pairs; the router never trained on their prompts."""
        trained = {id(p) for p in train}
        held = [p for p in held if id(p) not in trained]
        if not held:
            return
        grid = CONFIDENCE_GRID if self.opts.routing == "hard" else [c for c in CONFIDENCE_GRID if c > 0]
        prompts = [p.prompt for p in held]
        scores = {}
        for c in grid:
            self.opts.min_confidence = c
            chosen = self.score(prompts, [p.chosen for p in held]).rewards
            rejected = self.score(prompts, [p.rejected for p in held]).rewards
            per: dict[str, list[bool]] = {}
            for p, a, b in zip(held, chosen, rejected):
                per.setdefault(p.domain, []).append(a > b)
            scores[c] = sum(sum(v) / len(v) for v in per.values()) / len(per)
        best = max(grid, key=lambda c: (scores[c], -c))
        self.opts.min_confidence = best
        self.tuned = {"min_confidence": best, "validation_macro": {str(c): v for c, v in scores.items()},
                      "pairs": len(held)}

    def _share_trunks(self) -> None:
        """`top` tuning: domain RMs of one base share its frozen trunk in memory (one trunk + top blocks each)."""
        groups: dict[tuple[str, int], list[BaselineSystem]] = {}
        for rm in [*self.rms.values(), *([self.general] if self.general is not None else [])]:
            m = rm.config.model
            if rm.tuning.shared_trunk:
                groups.setdefault((m.backbone, m.trainable_layers), []).append(rm)
        for rms in groups.values():
            share_trunk([rm.backbone for rm in rms], rms[0].config.model)

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        domain = new_domain_of(pairs, list(self.rms))
        result = FitResult({})
        kind = self.calibration.kind  # the saved system's: a new route joins the scale its routes are on
        train, reference = hold_back(pairs, kind, self.opts.calibration_share, self.config.train.seed)
        self.rms[domain], sub = self._train_rm(domain, train, None, ctx)
        result.merge(sub, f"rm:{domain}")
        self._calibrate_new_route(domain, reference)
        return self._add_routed_domain(domain, pairs, ctx, model_dir, result)

    def _calibrate_new_route(self, domain: str, reference: dict[str, list[PreferencePair]]) -> None:
        if self.calibration.kind != "none":
            new = fit_calibration(self.calibration.kind, reference, self._raw, "")
            self.calibration = self.calibration.with_route(domain, new.scales[domain])

    def select_routes(self, reference: dict[str, list[PreferencePair]], train: Sequence[PreferencePair]) -> None:
        """Per domain: its RM's and the general RM's pairwise accuracy on the domain's held-back pairs, and who serves
        its route under the evidence rule (`routing.selection`): the general RM only where the slice resolves it as
        better; a domain with one prompt held nothing back and keeps its RM."""
        trained = {id(p) for p in train}
        rule = SelectionRule(self.opts.select_min_prompts, self.opts.select_level)
        self.selection = {}
        for d, pairs in sorted(reference.items()):
            held_back = bool(pairs) and not any(id(p) in trained for p in pairs)
            prompts = [p.prompt for p in pairs]
            correct = {}
            for route in (d, GENERAL):
                chosen = self._raw(route, prompts, [p.chosen for p in pairs])
                rejected = self._raw(route, prompts, [p.rejected for p in pairs])
                correct[route] = (chosen > rejected).float().tolist()
            self.selection[d] = select_route(d, correct[d], correct[GENERAL], pair_keys(pairs) if pairs else [],
                                             rule, held_back)

    @property
    def served_by_general(self) -> set[str]:
        """The domains whose routes the general RM serves (`options.select_routes`)."""
        return {d for d, s in self.selection.items() if s["served_by"] == "general"}

    def route_rewards(self, route: str, prompts: list[str], responses: list[str], batch_size: int = 32
                      ) -> torch.Tensor:
        """(N,) one route's rewards (a domain RM, or GENERAL) on the common scale, as `score` mixes them."""
        return self.calibration(route, self._raw(route, prompts, responses, batch_size))

    def _raw(self, route: str, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N,) raw rewards of one route (a domain RM, or GENERAL) on the given texts."""
        rm = self.general if route == GENERAL else self.rms[route]
        assert rm is not None
        return torch.tensor(rm.score(prompts, responses, batch_size=batch_size).rewards)

    def add_domain_rm(self, rm: BaselineSystem, pairs: Sequence[PreferencePair], ctx: FitContext,
                      model_dir: Path) -> FitResult:
        """Add a ready-made RM (e.g. an imported HF reward model) as the domain of `pairs`; only the router trains
        (on their prompts). The RM keeps its own config and encoder: its backbone, tokenizer and max_length may
        differ from the other RMs' (each domain RM is a saved system of its own)."""
        domain = new_domain_of(pairs, list(self.rms))
        self.rms[domain] = rm
        # an imported RM trained on none of these pairs: all of them are its reference
        self._calibrate_new_route(domain, {domain: list(pairs)})
        return self._add_routed_domain(domain, pairs, ctx, model_dir, FitResult({}))

    def _add_routed_domain(self, domain: str, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path,
                           result: FitResult) -> FitResult:
        self.router_examples += router_examples(pairs, self.opts.max_router_prompts_per_domain)
        result.add(self._train_router(ctx))
        # Write only what changed: the new RM, a new router version, then the index (the switch), last. Other RMs'
        # files stay byte-identical; a kill before the index leaves the old system loadable.
        self.rms[domain].save(model_dir / "rms" / domain_dir(domain))
        self.router_version = self._store(model_dir).swap(
            self.router_version, self._save_router, self.router_examples, self._index(),
            before_retire=lambda: self.write_system_file(model_dir))
        return result

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        self.check_mode(mode)
        if self.router is None:
            raise RuntimeError("RODOS has no router yet: fit or load it first")
        routes = self.router.routes(prompts, domains, batch_size)

        raw: list[dict[str, float]] = [{} for _ in prompts]  # per input, each route's raw reward
        by_general = self.served_by_general

        def of_route(route: str, rows: list[int]) -> torch.Tensor:
            serve = GENERAL if route in by_general else route  # options.select_routes: the general RM serves it
            r = self._raw(serve, [prompts[i] for i in rows], [responses[i] for i in rows], batch_size)  # (len(rows),)
            for i, v in zip(rows, r.tolist()):
                raw[i][route] = v
            return self.calibration(serve, r)  # on the common scale before any mix

        general = (lambda rows: of_route(GENERAL, rows)) if self.general is not None else None
        rewards = combine_rewards(routes, of_route, len(prompts), general)
        return ScoreOutput(rewards.tolist(), [{"system": self.name, **r.details(), "raw_rewards": raw[i],
                                               "calibration": self.calibration.kind,
                                               **({"served_by_general": sorted(by_general & set(r.weights))}
                                                  if by_general & set(r.weights) else {}),
                                               **({"fallback_to": "general" if r.general else "mixture"}
                                                  if r.source == "fallback" else {})}
                                              for i, r in enumerate(routes)])

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        comps: dict[str, nn.Module] = {f"rm:{d}": rm.model for d, rm in sorted(self.rms.items())}
        if self.general is not None:
            comps["rm:general"] = self.general.model
        if self.router is not None:
            comps["router"] = self.router.model
        return comps

    def component_files(self) -> dict[str, list[str]]:
        files = {f"rm:{d}": [f"rms/{domain_dir(d)}"] for d in self.rms}
        if self.general is not None:
            files["rm:general"] = [GENERAL_DIR]
        where = self._store(Path()).relative(self.router_version)
        files["router"] = [where["dir"], where["prompts"]]  # the calibration maps sit in the router folder
        return files

    @staticmethod
    def _store(path: Path) -> RouterStore:
        return RouterStore(path, RODOS_FILE)  # router[-vN]/ (its classifier inside) and router_prompts[-vN] on top

    def _save_router(self, paths: RouterPaths) -> None:
        assert self.router is not None
        self.router.save(paths)
        self.calibration.save(paths.calibration)

    def _index(self) -> dict[str, Any]:
        assert self.router is not None
        return {"domains": self.router.domains, "dirs": {d: domain_dir(d) for d in self.rms},
                **({"selection": self.selection} if self.selection else {}),
                **({"tuned": self.tuned} if self.tuned else {})}

    def save_components(self, path: Path) -> None:
        for d, rm in self.rms.items():
            rm.save(path / "rms" / domain_dir(d))
        if self.general is not None:
            self.general.save(path / GENERAL_DIR)
        assert self.router is not None
        self._store(path).write(self.router_version, self._save_router, self.router_examples, self._index())

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "RODOSSystem":
        if "router_layer" not in config.options:  # saved before the 1-block default: its router read every block
            config = dataclasses.replace(config, options={**config.options, "router_layer": None})
        store = cls._store(path)
        index = store.read_index()
        rms = {d: load_system(path / "rms" / sub, device) for d, sub in index["dirs"].items()}
        system = cls(config, rms=rms)  # type: ignore[arg-type]
        system.router_version = store.version()
        system.selection = dict(index.get("selection") or {})
        system.tuned = dict(index.get("tuned") or {})
        if system.tuned:  # the threshold chosen on the held-back slice, over the config's
            system.opts.min_confidence = float(system.tuned["min_confidence"])
        paths = store.paths(system.router_version)
        system.router = Router.load(paths, config, system.opts, index["domains"])
        if device is not None:
            system.router.model.to(device)
        system.router_examples = load_router_examples(paths.prompts)
        system.calibration = Calibration.load(paths.calibration)
        if (path / GENERAL_DIR / SYSTEM_FILE).exists():
            system.general = load_system(path / GENERAL_DIR, device)  # type: ignore[assignment]
        system._share_trunks()
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["domains"] = self.domains
        info["router_tuning"] = self.opts.router_tuning  # the router's own tuning, beside the RMs' model.tuning
        info["calibration"] = self.calibration.to_dict()
        if self.selection:
            info["route_selection"] = self.selection
        if self.tuned:
            info["tuned"] = self.tuned
        return info
