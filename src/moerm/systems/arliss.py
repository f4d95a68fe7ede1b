"""ARLISS (Namgoong et al. 2024): one frozen base model carrying one LoRA adapter per domain RM plus a router adapter.

The router adapter (with a linear head) classifies the prompt; the chosen domain's adapter (with its reward head)
scores the (prompt, response). Everything shares one set of base weights, so a domain costs only an adapter and a
head. Two inference modes:

- `switch` (the paper's way): per input, `set_adapter("router")`, classify, `set_adapter(domain)`, score. Slow.
- `batched`: one router pass over the batch, then one reward pass in which each row goes through its own domain's
  adapter (`modules.adapters.encode_through`: a peft mixed-adapter batch, or one pass per adapter where the
  architecture cannot mix them, e.g. DeBERTa-v3). Fallback rows are duplicated once per domain in the same pass and
  mixed with the router's probabilities (`combine_rewards`); so are soft/gated mixes (`options.routing`).

The router reads the prompt's first `options.router_max_length` tokens. `options.router_tuning=lora` (the paper's):
a LoRA adapter and a linear head on the shared base, a pass through every block. `frozen`: a linear head on the mean
of those tokens' pretrained states after the first `options.router_layer` blocks (adapters off), so only those
blocks run for it; no router adapter is trained or saved.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from moerm.encoding import Backbone, backbone_kwargs, load_backbone, make_encoder
from moerm.config import ConfigError, RunConfig, from_dict
from moerm.data.schema import PreferencePair
from moerm.encoding.adapters import encode_through, lora_parameters
from moerm.errors import UserError
from moerm.encoding.tuning import (
    ParamView, add_adapter, base_parameters, load_adapter, set_trainable_adapter, tuning_mode,
)
from moerm.modules.reward_model import RewardModel
from moerm.systems.components import ComponentFit, fit_component
from moerm.modules.heads import RewardHead
from moerm.systems.base import FitContext, FitResult, RewardSystem, ScoreOutput, register
from moerm.systems.routing import (
    ROUTER_DEFAULTS, EarlyLayers, Route, Router, RouterLayout, RouterOptions, RouterPaths, RouterStore, SharedAdapter,
    combine_rewards, decide_routes, load_router_examples, new_domain_of, require_routes, router_examples, safe_name,
)
from moerm.atomic import atomic_save_safetensors
from moerm.systems.calibration import Calibration, fit_calibration, hold_back, reference_source
from moerm.train.pairwise import TokenPairs

ARLISS_FILE = "arliss.json"
ROUTER_LAYOUT = RouterLayout(dir_parent="adapters", head_parent="heads")  # adapters/router[-vN], heads/router[-vN]
ROUTER = "router"
RESERVED = {ROUTER, "default", "__base__"}  # peft's default folder name / its "no adapter" marker
INFERENCE_MODES = ("batched", "switch")
ARLISS_ROUTERS = ("lora", "frozen")


@dataclass
class ARLISSOptions(RouterOptions):
    """Router options plus the inference mode; the router is a LoRA adapter on the shared base (the paper's), or a
    classifier on its pretrained early states."""

    # lora: a LoRA adapter + linear head on the shared base (the paper); frozen: a linear head on the mean of the
    # prompt tokens' pretrained states after the first `router_layer` blocks, adapters off (only those blocks run)
    router_tuning: str = "lora"
    router_layer: int = 1  # frozen router: how many blocks its features pass through (1..blocks - 1)
    inference: str = "batched"  # batched: peft mixed-adapter batches; switch: set_adapter per input (the paper)

    router_tunings = ARLISS_ROUTERS
    # earlier releases took these keys and refused other values (fallback, ood) or ignored them (ood_quantile)
    legacy = {"fallback": "mixture", "ood": "none", "ood_quantile": ...}

    def __post_init__(self) -> None:
        if self.router_tuning not in ARLISS_ROUTERS:
            raise ConfigError(f"arliss's router is a LoRA adapter on the shared base (lora) or a classifier on its "
                              f"pretrained early states (frozen): options.router_tuning must be lora or frozen, got "
                              f"{self.router_tuning!r} (a fully tuned or trunk router is a rodos option)")
        super().__post_init__()
        if self.inference not in INFERENCE_MODES:
            raise UserError(f"options.inference must be batched or switch; got {self.inference!r}")


def adapter_name(domain: str) -> str:
    """A peft/ModuleDict-safe adapter name: the domain itself when safe, else a sanitised name plus a short hash."""
    return safe_name(domain, allowed="A-Za-z0-9_", sep="_", reserved=frozenset(RESERVED))


class ARLISSModel(nn.Module):
    """The shared base (a PeftModel with every adapter) and the heads, keyed by adapter name."""

    def __init__(self, backbone: Backbone, heads: dict[str, nn.Module], router_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)  # adapter name -> RewardHead: (N, H) -> (N,)
        self.router_head = router_head  # Linear: (N, H) -> (N, D)

    @property
    def peft(self) -> PeftModel:
        return self.backbone.model  # type: ignore[return-value]


@register
class ARLISSSystem(RewardSystem):
    """Router adapter + one LoRA adapter and head per domain, on one frozen base model."""

    name = "arliss"
    options_class = ARLISSOptions
    tunings = ("lora", "top")  # one LoRA adapter per domain on a frozen base (top: on its top blocks, cached trunk)
    default_tuning = "lora"
    top_style = "lora"
    inference_modes = INFERENCE_MODES
    routed = True
    component_defaults = {"rm": {}, "router": ROUTER_DEFAULTS}

    def __init__(self, config: RunConfig, model: ARLISSModel | None = None, domains: Sequence[str] = (),
                 examples: Sequence[tuple[str, str]] = ()):
        super().__init__(config)
        config = self.config
        self.opts: ARLISSOptions = self.options
        self.model = model
        self.domains = list(domains)  # router label order
        self.router_examples: list[tuple[str, str]] = list(examples)
        self.router_version = 0  # which RouterStore version the saved folder uses (add-domain moves it on)
        self.router: Router | None = None if model is None else self._router_on(model)
        self.calibration = Calibration()  # each domain adapter's map onto the common scale (options.calibration)
        self.encoder = make_encoder(config.model.backbone, config.model.max_length)
        # The router reads only the prompt's first tokens (options.router_max_length), as in RODOS.
        self.router_encoder = make_encoder(config.model.backbone, self.opts.router_max_length)

    @property
    def domains(self) -> list[str]:
        return self._domains

    @domains.setter
    def domains(self, value: Sequence[str]) -> None:
        self._domains = list(value)

    @property
    def frozen_router(self) -> bool:
        return self.opts.router_tuning == "frozen"

    @property
    def default_mode(self) -> str:
        return self.opts.inference

    @property
    def adapters(self) -> dict[str, str]:
        return {d: adapter_name(d) for d in self.domains}

    @property
    def device(self) -> torch.device:
        assert self.model is not None
        return next(self.model.parameters()).device

    def _require(self) -> ARLISSModel:
        if self.model is None:
            raise RuntimeError("ARLISS has no model yet: fit or load it first")
        return self.model

    # -- building blocks
    def _new_head(self, hidden: int) -> RewardHead:
        m = self.config.model
        return RewardHead(hidden, m.head, m.head_hidden, m.head_dropout)

    def _add_adapter(self, backbone: Backbone, name: str) -> None:
        """One more LoRA adapter on the shared base; seeded for repeatability."""
        torch.manual_seed(self.config.train.seed)
        add_adapter(backbone, name, self.tuning.adapter_config(backbone, self.config.model))  # top: top blocks only

    def _activate(self, name: str) -> None:
        """Make adapter `name` active and the only trainable LoRA; only its head (or the router head) trains.

        peft's set_adapter already sets requires_grad this way; we set it explicitly so it holds for loaded models too.
        """
        model = self._require()
        model.peft.set_adapter(name)
        set_trainable_adapter(model.peft, name)
        for key, head in model.heads.items():
            head.requires_grad_(key == name)
        model.router_head.requires_grad_(name == ROUTER)

    def _train_rm(self, domain: str, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None,
                  ctx: FitContext) -> ComponentFit:
        model, t = self._require(), self.train_config("rm")
        name = adapter_name(domain)
        self._activate(name)
        data = TokenPairs.build([p for p in train if p.domain == domain], self.encoder, progress=ctx.progress)
        ev = [p for p in eval if p.domain == domain] if eval else []
        eval_data = TokenPairs.build(ev, self.encoder) if ev else None
        path = RewardModel(model.backbone, model.heads[name])  # through the active adapter and this domain's head
        return fit_component(f"rm:{domain}", path, data, t, ctx, ctx.out_dir / "components" / f"rm-{name}",
                             [(model.backbone, t.lr), (model.heads[name], t.head_lr or t.lr)], eval_data)

    def _router_on(self, model: ARLISSModel) -> Router:
        """The router on the shared base: its LoRA adapter (lora), or the pretrained early states (frozen), under
        `model.router_head`."""
        backend = (EarlyLayers(model.backbone, self.router_encoder, self.opts.router_layer) if self.frozen_router
                   else SharedAdapter(model.backbone, self.router_encoder, ROUTER))
        return Router.on(backend, model.router_head, self.config, self.opts, self.domains)

    def _train_router(self, ctx: FitContext, eval: Sequence[PreferencePair] | None = None) -> ComponentFit:
        """(Re)build the router (its adapter, unless frozen, and its head) from scratch for the current domains, and
        train it; its accuracy is measured on the held-out pairs' prompts (`eval`), never on its training prompts."""
        model = self._require()
        if not self.frozen_router:
            if ROUTER in model.peft.peft_config:
                model.peft.delete_adapter(ROUTER)
            self._add_adapter(model.backbone, ROUTER)
        torch.manual_seed(self.config.train.seed)
        model.router_head = nn.Linear(model.backbone.hidden_size, len(self.domains)).to(self.device)
        if self.frozen_router:
            model.heads.requires_grad_(False)
        else:
            self._activate(ROUTER)
        self.router = self._router_on(model)
        held_out = router_examples(eval or [], self.opts.max_router_prompts_per_domain)
        return self.router.fit(self.router_examples, ctx.out_dir / "components" / "router", ctx,
                               self.train_config("router"), held_out)

    # -- training
    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        m = self.config.model
        self.domains = sorted({p.domain for p in train})
        require_routes(self.domains, self.name)
        backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(self.config))
        self.tuning.mark_trunk(backbone, m)
        heads: dict[str, nn.Module] = {}
        for d in self.domains:
            self._add_adapter(backbone, adapter_name(d))
            heads[adapter_name(d)] = self._new_head(backbone.hidden_size)
        self.model = ARLISSModel(backbone, heads, nn.Linear(backbone.hidden_size, len(self.domains)))
        result = FitResult({})
        o = self.opts
        train, reference = hold_back(train, o.calibration, o.calibration_share, self.config.train.seed)
        for d in self.domains:
            result.add(self._train_rm(d, train, eval, ctx), f"rm:{d}")
        self.calibration = fit_calibration(o.calibration, reference, self._raw,
                                           reference_source(reference, train, o.calibration_share))
        self.router_examples = router_examples(train, self.opts.max_router_prompts_per_domain)
        result.add(self._train_router(ctx, eval), ROUTER)  # router:eval_accuracy on held-out prompts only
        return result

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        model = self._require()
        domain = new_domain_of(pairs, self.domains)
        name = adapter_name(domain)
        if name in self.adapters.values():
            raise UserError(f"domain {domain!r} maps to adapter name {name!r}, which another domain uses")
        self._add_adapter(model.backbone, name)
        model.heads[name] = self._new_head(model.backbone.hidden_size).to(self.device)
        self.domains = sorted([*self.domains, domain])
        result = FitResult({})
        kind = self.calibration.kind  # the saved system's: a new route joins the scale its routes are on
        train, reference = hold_back(pairs, kind, self.opts.calibration_share, self.config.train.seed)
        result.add(self._train_rm(domain, train, None, ctx), f"rm:{domain}")
        if kind != "none":
            new = fit_calibration(kind, reference, self._raw, "")
            self.calibration = self.calibration.with_route(domain, new.scales[domain])
        self.router_examples += router_examples(pairs, self.opts.max_router_prompts_per_domain)
        result.add(self._train_router(ctx))
        # Write only what changed: the new adapter and head, a new router version, then the index (the switch), last.
        # The other adapters' folders and heads stay byte-identical; a kill before the index leaves the old system.
        self._save_adapters(model_dir, [name])
        self.router_version = self._store(model_dir).swap(
            self.router_version, self._save_router, self.router_examples, self._index(),
            before_retire=lambda: self.write_system_file(model_dir))
        return result

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        mode = self.check_mode(mode)
        self._require().eval()  # peft refuses adapter_names in training mode; no dropout at inference
        with torch.no_grad():
            if mode == "batched":
                rewards, routes, raw = self._score_batched(prompts, responses, domains, batch_size)
            else:
                rewards, routes, raw = self._score_switch(prompts, responses, domains)
        details = [{"system": self.name, **r.details(), "adapter": r.domain, "inference": mode,
                    "raw_rewards": {d: raw[(i, d)] for d in r.weights}, "calibration": self.calibration.kind}
                   for i, r in enumerate(routes)]
        return ScoreOutput(rewards.tolist(), details)

    def _forward(self, encoded: list[dict[str, list[int]]], names: list[str] | None) -> torch.Tensor:
        """Pooled features (b, H); `names` gives each row's adapter (`encode_through`), None uses the active adapter."""
        model = self._require()
        batch = {k: v.to(self.device) for k, v in self.encoder.pad(encoded).items()}  # (b, T)
        if names is None:
            return model.backbone(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return encode_through(model.backbone, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                              names)

    def _routes(self, prompts: Sequence[str], hints: Sequence[str | None] | None, batch_size: int) -> list[Route]:
        """One router pass over the batch's distinct prompts, then `decide_routes`."""
        if self.router is None:
            self.router = self._router_on(self._require())
        return self.router.routes(prompts, hints, batch_size)

    def _score_batched(self, prompts: Sequence[str], responses: Sequence[str], hints: Sequence[str | None] | None,
                       batch_size: int) -> tuple[torch.Tensor, list[Route], dict[tuple[int, str], float]]:
        routes = self._routes(prompts, hints, batch_size)
        # One job per (input, domain RM) its route weighs: top-1 inputs once, mixed inputs once per mixed domain.
        scores = self._job_scores(prompts, responses, [(i, d) for i, r in enumerate(routes) for d in r.weights],
                                  batch_size)
        rewards = combine_rewards(
            routes, lambda d, rows: self.calibration(d, torch.tensor([scores[(i, d)] for i in rows])), len(prompts))
        return rewards, routes, scores

    def _job_scores(self, prompts: Sequence[str], responses: Sequence[str], jobs: list[tuple[int, str]],
                    batch_size: int) -> dict[tuple[int, str], float]:
        """Raw rewards of (input, domain) jobs: one mixed-adapter pass per length-sorted batch of jobs."""
        model = self._require()
        encoded = [self.encoder.encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(jobs)), key=lambda j: len(encoded[jobs[j][0]]["input_ids"]))
        scores: dict[tuple[int, str], float] = {}
        for s in range(0, len(order), batch_size):
            chunk = [jobs[j] for j in order[s : s + batch_size]]
            names = [adapter_name(d) for _, d in chunk]
            feats = self._forward([encoded[i] for i, _ in chunk], names)  # (b, H), row k through adapter names[k]
            for name in set(names):
                rows = [k for k, n in enumerate(names) if n == name]
                r = model.heads[name](feats[rows]).float().cpu()  # (len(rows),)
                for k, v in zip(rows, r.tolist()):
                    scores[chunk[k]] = v
        return scores

    def _raw(self, route: str, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N,) raw rewards of one domain's adapter on the given texts."""
        self._require().eval()
        with torch.no_grad():
            scores = self._job_scores(prompts, responses, [(i, route) for i in range(len(prompts))], batch_size)
        return torch.tensor([scores[(i, route)] for i in range(len(prompts))])

    def _score_switch(self, prompts: Sequence[str], responses: Sequence[str],
                      hints: Sequence[str | None] | None
                      ) -> tuple[torch.Tensor, list[Route], dict[tuple[int, str], float]]:
        """The paper's inference: per input, switch to the router adapter, classify, switch to the domain, score."""
        model = self._require()
        rewards = torch.zeros(len(prompts))
        routes: list[Route] = []
        raw: dict[tuple[int, str], float] = {}
        for i, (p, resp) in enumerate(zip(prompts, responses)):
            prompt = [self.router_encoder.encode_single(p)]
            if self.frozen_router:  # (1, D): the router's blocks only, no adapter to switch to
                logits = model.router_head(EarlyLayers(model.backbone, self.router_encoder,
                                                       self.opts.router_layer).features(prompt))
            else:
                model.peft.set_adapter(ROUTER)
                logits = model.router_head(self._forward(prompt, None))  # (1, D)
            probs = torch.softmax(logits.float(), -1)
            (route,) = decide_routes(probs.cpu(), self.domains, [hints[i]] if hints is not None else None, self.opts)
            enc = self.encoder.encode(p, resp)

            def one(d: str, rows: list[int], enc: dict[str, list[int]] = enc, i: int = i) -> torch.Tensor:
                model.peft.set_adapter(adapter_name(d))
                r = model.heads[adapter_name(d)](self._forward([enc], None)).float().cpu()  # (1,)
                raw[(i, d)] = float(r[0])
                return self.calibration(d, r)

            rewards[i] = combine_rewards([route], one, 1)[0]
            routes.append(route)
        return rewards, routes, raw

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        model = self._require()
        comps: dict[str, nn.Module] = {"base": ParamView(base_parameters(model.peft))}
        for d, name in self.adapters.items():
            comps[f"adapter:{d}"] = ParamView(lora_parameters(model.peft, name))
            comps[f"head:{d}"] = model.heads[name]
        if not self.frozen_router:
            comps[f"adapter:{ROUTER}"] = ParamView(lora_parameters(model.peft, ROUTER))
        comps[f"head:{ROUTER}"] = model.router_head
        return comps

    def component_files(self) -> dict[str, list[str]]:
        files: dict[str, list[str]] = {"base": []}  # the base is referenced by config.model.backbone, not copied
        for d, name in self.adapters.items():
            files[f"adapter:{d}"] = [f"adapters/{name}"]
            files[f"head:{d}"] = [f"heads/{name}.safetensors"]
        r = self._store(Path()).relative(self.router_version)
        if not self.frozen_router:
            files[f"adapter:{ROUTER}"] = [r["dir"]]
        files[f"head:{ROUTER}"] = [r["head"], r["prompts"], r["calibration"]]
        return files

    @staticmethod
    def _store(path: Path) -> RouterStore:
        return RouterStore(path, ARLISS_FILE, ROUTER_LAYOUT)

    def _index(self) -> dict[str, Any]:
        return {"domains": self.domains, "adapters": self.adapters, "router_tuning": self.opts.router_tuning,
                **({} if self.frozen_router else {"router_adapter": ROUTER})}

    def _save_adapters(self, path: Path, names: list[str]) -> None:
        """One subfolder per domain adapter (safetensors) and its head beside it in heads/<name>.safetensors."""
        model = self._require()
        model.peft.save_pretrained(str(path / "adapters"), selected_adapters=names, safe_serialization=True)
        for name in names:
            atomic_save_safetensors(model.heads[name].state_dict(), path / "heads" / f"{name}.safetensors")

    def _save_router(self, paths: RouterPaths) -> None:
        """The router adapter (lora; peft writes it under its own name, so through a staging folder) and its head."""
        model = self._require()
        if not self.frozen_router:
            staging = paths.dir.parent / f".router-staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            model.peft.save_pretrained(str(staging), selected_adapters=[ROUTER], safe_serialization=True)
            os.replace(staging / ROUTER, paths.dir)
            shutil.rmtree(staging, ignore_errors=True)
        if self.router is None:
            self.router = self._router_on(model)
        self.router.save(paths)
        self.calibration.save(paths.calibration)

    def save_components(self, path: Path) -> None:
        self._save_adapters(path, list(self.adapters.values()))
        self._store(path).write(self.router_version, self._save_router, self.router_examples, self._index())

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "ARLISSSystem":
        store = cls._store(path)
        index = store.read_index()
        domains: list[str] = index["domains"]
        adapters: dict[str, str] = index["adapters"]
        m = config.model
        backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
        tuning_mode(m.tuning, cls.top_style).mark_trunk(backbone, m)
        names = [adapters[d] for d in domains]
        version = store.version()
        paths = store.paths(version)
        saved = index.get("router_tuning", "lora")
        if saved != from_dict(ARLISSOptions, ARLISSOptions.without_legacy(config.options, cls.name),
                              "options").router_tuning:
            raise UserError(f"{store.index_path} holds a router with options.router_tuning={saved}, which its "
                            "config does not say: a router cannot be switched without retraining it")
        # is_trainable keeps the adapters trainable so `add_domain` can run on a loaded system.
        for name in names:
            load_adapter(backbone, path / "adapters" / name, name, trainable=True)
        if saved == "lora":
            load_adapter(backbone, paths.dir, ROUTER, trainable=True)
        system = cls(config, domains=domains, examples=load_router_examples(paths.prompts))
        system.router_version = version
        heads: dict[str, nn.Module] = {}
        for name in names:
            heads[name] = system._new_head(backbone.hidden_size)
            heads[name].load_state_dict(load_file(str(path / "heads" / f"{name}.safetensors")))
        system.model = ARLISSModel(backbone, heads, nn.Linear(backbone.hidden_size, len(domains)))
        system.router = system._router_on(system.model)
        system.router.load_head(paths)
        system.calibration = Calibration.load(paths.calibration)
        if device is not None:
            system.model.to(device)
        system.model.eval()
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["domains"] = self.domains
        info["adapters"] = self.adapters
        info["router_tuning"] = self.opts.router_tuning
        info["calibration"] = self.calibration.to_dict()
        return info
