"""ARLISS (Namgoong et al. 2024): one frozen base model carrying one LoRA adapter per domain RM plus a router adapter.

The router adapter (with a linear head) classifies the prompt; the chosen domain's adapter (with its reward head)
scores the (prompt, response). Everything shares one set of base weights, so a domain costs only an adapter and a
head. Two inference modes:

- `switch` (the paper's way): per input, `set_adapter("router")`, classify, `set_adapter(domain)`, score. Slow.
- `batched`: one router pass over the batch, then one reward pass in which each row goes through its own domain's
  adapter (`modules.adapters.encode_through`: a peft mixed-adapter batch, or one pass per adapter where the
  architecture cannot mix them, e.g. DeBERTa-v3). Fallback rows are duplicated once per domain in the same pass and
  mixed with the router's probabilities (`combine_rewards`).

`options.router_tuning` is ignored: the ARLISS router is always a LoRA adapter on the shared base.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from moerm.backbone import Backbone, backbone_kwargs, load_backbone, make_encoder
from moerm.config import ConfigError, RunConfig
from moerm.data.schema import PreferencePair
from moerm.modules.adapters import encode_through, lora_parameters
from moerm.modules.heads import RewardHead
from moerm.systems.base import SYSTEM_FILE, FitContext, FitResult, RewardSystem, ScoreOutput, register
from moerm.systems.baseline import lora_config
from moerm.systems.routing import (
    ROUTER_PROMPTS, PromptTexts, Route, RouterOptions, classification_eval, classification_step, combine_rewards,
    decide_routes, load_router_examples, new_domain_of, prompt_probs, router_examples, save_router_examples,
)
from moerm.train.checkpoint import atomic_save_safetensors, atomic_write_text
from moerm.train.pairwise import TokenPairs, make_pairwise_step, pairwise_eval
from moerm.train.trainer import Trainer

ARLISS_FILE = "arliss.json"
ROUTER = "router"
RESERVED = {ROUTER, "default", "__base__"}  # peft's default folder name / its "no adapter" marker
INFERENCE_MODES = ("batched", "switch")


@dataclass
class ARLISSOptions(RouterOptions):
    """Router options plus the inference mode; `router_tuning` is ignored (the router is always a LoRA adapter)."""

    inference: str = "batched"  # batched: peft mixed-adapter batches; switch: set_adapter per input (the paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"options.inference must be batched or switch; got {self.inference!r}")
        if self.fallback != "mixture":
            raise ValueError("arliss supports options.fallback=mixture only (a general fallback RM is a rodos option)")


def adapter_name(domain: str) -> str:
    """A peft/ModuleDict-safe adapter name: the domain itself when safe, else a sanitised name plus a short hash."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", domain)[:60] or "d"
    if safe == domain and domain not in RESERVED:
        return safe
    return f"{safe}_{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


class _ParamView(nn.Module):
    """Shares (never copies) a set of parameters, so `count_params` can count one component of a shared model."""

    def __init__(self, params: Sequence[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(list(params))


class _RewardPath(nn.Module):
    """Tokens (N, T) -> rewards (N,) through the backbone's *active* adapter and one domain head."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(input_ids, attention_mask, token_type_ids))  # (N, H) -> (N,)


class _RouterPath(_RewardPath):
    """Prompt tokens (N, T) -> domain logits (N, D) through the active (router) adapter and the router head."""


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

    def __init__(self, config: RunConfig, model: ARLISSModel | None = None, domains: Sequence[str] = (),
                 examples: Sequence[tuple[str, str]] = ()):
        if config.model.tuning not in ("auto", "lora"):
            raise ConfigError(f"arliss trains one LoRA adapter per domain on a frozen base: model.tuning must be lora "
                              f"or auto, got {config.model.tuning!r}")
        super().__init__(dataclasses.replace(config, model=dataclasses.replace(config.model, tuning="lora")))
        config = self.config
        self.opts: ARLISSOptions = self.options
        self.model = model
        self.domains: list[str] = list(domains)  # router label order
        self.router_examples: list[tuple[str, str]] = list(examples)
        self.encoder = make_encoder(config.model.backbone, config.model.max_length)
        # The router reads only the prompt's first tokens (options.router_max_length), as in RODOS.
        self.router_encoder = make_encoder(config.model.backbone, self.opts.router_max_length)

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
        """Wrap the base once (first adapter), then add adapters to the same PeftModel; seeded for repeatability."""
        torch.manual_seed(self.config.train.seed)
        if isinstance(backbone.model, PeftModel):
            backbone.model.add_adapter(name, lora_config(self.config))
        else:
            backbone.model = get_peft_model(backbone.model, lora_config(self.config), adapter_name=name)

    def _activate(self, name: str) -> None:
        """Make adapter `name` active and the only trainable LoRA; only its head (or the router head) trains.

        peft's set_adapter already sets requires_grad this way; we set it explicitly so it holds for loaded models too.
        """
        model = self._require()
        model.peft.set_adapter(name)
        for n, p in model.peft.named_parameters():
            p.requires_grad_(("lora_A" in n or "lora_B" in n) and f".{name}." in n)
        for key, head in model.heads.items():
            head.requires_grad_(key == name)
        model.router_head.requires_grad_(name == ROUTER)

    def _train_rm(self, domain: str, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None,
                  ctx: FitContext) -> tuple[float, dict[str, float]]:
        model, t = self._require(), self.config.train
        name = adapter_name(domain)
        self._activate(name)
        data = TokenPairs.build([p for p in train if p.domain == domain], self.encoder, progress=ctx.progress)
        ev = [p for p in eval if p.domain == domain] if eval else []
        eval_data = TokenPairs.build(ev, self.encoder) if ev else None
        path = _RewardPath(model.backbone, model.heads[name])
        trainer = Trainer(
            path, make_pairwise_step(t.center_rewards_coefficient, t.use_margin), data, data.collate, t,
            ctx.out_dir / "components" / f"rm-{name}", [(model.backbone, t.lr), (model.heads[name], t.head_lr or t.lr)],  # name == domain when safe
            eval_fn=(lambda m: pairwise_eval(m, eval_data, t.eval_batch_size)) if eval_data is not None else None,
            desc=f"rm:{domain}", progress=ctx.progress, stop_after_steps=ctx.stop_after_steps,
        )
        result = trainer.train(resume=ctx.resume)
        model.to(trainer.accelerator.device)
        return result.seconds, {f"{k}:{domain}": v for k, v in result.final_metrics.items()}

    def _train_router(self, ctx: FitContext, eval: Sequence[PreferencePair] | None = None) -> tuple[float, dict[str, float]]:
        """(Re)build the router adapter and head from scratch for the current domains, and train them; its accuracy
        is measured on the held-out pairs' prompts (`eval`), never on its training prompts."""
        model = self._require()
        if ROUTER in model.peft.peft_config:
            model.peft.delete_adapter(ROUTER)
        self._add_adapter(model.backbone, ROUTER)
        torch.manual_seed(self.config.train.seed)
        model.router_head = nn.Linear(model.backbone.hidden_size, len(self.domains)).to(self.device)
        self._activate(ROUTER)
        data = PromptTexts.build(self.router_examples, self.domains, self.router_encoder)
        held_out = [(p, d) for p, d in router_examples(eval or [], self.opts.max_router_prompts_per_domain)
                    if d in self.domains]
        eval_data = PromptTexts.build(held_out, self.domains, self.router_encoder) if held_out else None
        t_cfg = dataclasses.replace(self.config.train, lr=self.opts.router_lr, head_lr=self.opts.router_lr,
                                    epochs=self.opts.router_epochs, max_steps=None)
        path = _RouterPath(model.backbone, model.router_head)
        trainer = Trainer(path, classification_step, data, data.collate, t_cfg, ctx.out_dir / "components" / "router",
                          [(model.backbone, t_cfg.lr), (model.router_head, t_cfg.lr)],
                          eval_fn=(lambda m: classification_eval(m, eval_data)) if eval_data is not None else None,
                          desc="router", progress=ctx.progress, stop_after_steps=ctx.stop_after_steps)
        result = trainer.train(resume=ctx.resume)
        model.to(trainer.accelerator.device)
        acc = result.final_metrics.get("eval_accuracy")
        return result.seconds, ({"router:eval_accuracy": acc} if acc is not None else {})

    # -- training
    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        m = self.config.model
        self.domains = sorted({p.domain for p in train})
        backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(self.config))
        heads: dict[str, nn.Module] = {}
        for d in self.domains:
            self._add_adapter(backbone, adapter_name(d))
            heads[adapter_name(d)] = self._new_head(backbone.hidden_size)
        self.model = ARLISSModel(backbone, heads, nn.Linear(backbone.hidden_size, len(self.domains)))
        seconds: dict[str, float] = {}
        metrics: dict[str, float] = {}
        for d in self.domains:
            seconds[f"rm:{d}"], sub = self._train_rm(d, train, eval, ctx)
            metrics.update(sub)
        self.router_examples = router_examples(train, self.opts.max_router_prompts_per_domain)
        seconds[ROUTER], sub = self._train_router(ctx, eval)
        metrics.update(sub)
        return FitResult(metrics, seconds)

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        model = self._require()
        domain = new_domain_of(pairs, self.domains)
        name = adapter_name(domain)
        if name in self.adapters.values():
            raise ValueError(f"domain {domain!r} maps to adapter name {name!r}, which another domain uses")
        self._add_adapter(model.backbone, name)
        model.heads[name] = self._new_head(model.backbone.hidden_size).to(self.device)
        self.domains = sorted([*self.domains, domain])
        seconds: dict[str, float] = {}
        seconds[f"rm:{domain}"], metrics = self._train_rm(domain, pairs, None, ctx)
        self.router_examples += router_examples(pairs, self.opts.max_router_prompts_per_domain)
        seconds[ROUTER], sub = self._train_router(ctx)
        metrics.update(sub)
        # Write only what changed; the other adapters' folders and heads stay byte-identical.
        self._save_adapters(model_dir, [name, ROUTER])
        self._save_router_and_index(model_dir)
        meta = {"system": self.name, "format": 1, "config": self.config.to_dict()}
        atomic_write_text(model_dir / SYSTEM_FILE, json.dumps(meta, indent=2))
        return FitResult(metrics, seconds)

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        mode = mode or self.opts.inference
        if mode not in INFERENCE_MODES:
            raise ValueError(f"mode must be batched or switch; got {mode!r}")
        self._require().eval()  # peft refuses adapter_names in training mode; no dropout at inference
        with torch.no_grad():
            if mode == "batched":
                rewards, routes = self._score_batched(prompts, responses, domains, batch_size)
            else:
                rewards, routes = self._score_switch(prompts, responses, domains)
        details = [{"system": self.name, **r.details(), "adapter": r.domain, "inference": mode} for r in routes]
        return ScoreOutput(rewards.tolist(), details)

    def _forward(self, encoded: list[dict[str, list[int]]], names: list[str] | None) -> torch.Tensor:
        """Pooled features (b, H); `names` gives each row's adapter (`encode_through`), None uses the active adapter."""
        model = self._require()
        batch = {k: v.to(self.device) for k, v in self.encoder.pad(encoded).items()}  # (b, T)
        if names is None:
            return model.backbone(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return encode_through(model.backbone, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                              names)

    def _router_probs(self, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        """(N, D) router probabilities, every row through the router adapter; each distinct prompt once."""
        model = self._require()
        return prompt_probs(prompts, self.router_encoder,
                            lambda rows: model.router_head(self._forward(rows, [ROUTER] * len(rows))),  # (b, H) -> (b, D)
                            len(self.domains), batch_size)

    def _score_batched(self, prompts: Sequence[str], responses: Sequence[str], hints: Sequence[str | None] | None,
                       batch_size: int) -> tuple[torch.Tensor, list[Route]]:
        model = self._require()
        routes = decide_routes(self._router_probs(prompts, batch_size), self.domains, hints, self.opts.min_confidence)
        # One job per (input, domain) needed: routed inputs once, fallback inputs once per domain.
        jobs = [(i, d) for i, r in enumerate(routes) for d in ([r.domain] if r.domain is not None else self.domains)]
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
        rewards = combine_rewards(routes, lambda d, rows: torch.tensor([scores[(i, d)] for i in rows]), len(prompts))
        return rewards, routes

    def _score_switch(self, prompts: Sequence[str], responses: Sequence[str],
                      hints: Sequence[str | None] | None) -> tuple[torch.Tensor, list[Route]]:
        """The paper's inference: per input, switch to the router adapter, classify, switch to the domain, score."""
        model = self._require()
        rewards = torch.zeros(len(prompts))
        routes: list[Route] = []
        for i, (p, resp) in enumerate(zip(prompts, responses)):
            model.peft.set_adapter(ROUTER)
            probs = torch.softmax(model.router_head(self._forward([self.router_encoder.encode_single(p)], None)).float(), -1)
            (route,) = decide_routes(probs.cpu(), self.domains, [hints[i]] if hints is not None else None,
                                     self.opts.min_confidence)
            enc = self.encoder.encode(p, resp)

            def one(d: str, rows: list[int], enc: dict[str, list[int]] = enc) -> torch.Tensor:
                model.peft.set_adapter(adapter_name(d))
                return model.heads[adapter_name(d)](self._forward([enc], None)).float().cpu()  # (1,)

            rewards[i] = combine_rewards([route], one, 1)[0]
            routes.append(route)
        return rewards, routes

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        model = self._require()
        lora = {id(p) for n, p in model.peft.named_parameters() if "lora_A" in n or "lora_B" in n}
        comps: dict[str, nn.Module] = {"base": _ParamView([p for p in model.peft.parameters() if id(p) not in lora])}
        for d, name in self.adapters.items():
            comps[f"adapter:{d}"] = _ParamView(lora_parameters(model.peft, name))
            comps[f"head:{d}"] = model.heads[name]
        comps[f"adapter:{ROUTER}"] = _ParamView(lora_parameters(model.peft, ROUTER))
        comps[f"head:{ROUTER}"] = model.router_head
        return comps

    def component_files(self) -> dict[str, list[str]]:
        files: dict[str, list[str]] = {"base": []}  # the base is referenced by config.model.backbone, not copied
        for d, name in [*self.adapters.items(), (ROUTER, ROUTER)]:
            files[f"adapter:{d}"] = [f"adapters/{name}"]
            files[f"head:{d}"] = [f"heads/{name}.safetensors"]
        files[f"head:{ROUTER}"].append(ROUTER_PROMPTS)
        return files

    def _save_adapters(self, path: Path, names: list[str]) -> None:
        """One subfolder per adapter (safetensors) and its head beside it in heads/<name>.safetensors."""
        model = self._require()
        model.peft.save_pretrained(str(path / "adapters"), selected_adapters=names, safe_serialization=True)
        for name in names:
            head = model.router_head if name == ROUTER else model.heads[name]
            atomic_save_safetensors(head.state_dict(), path / "heads" / f"{name}.safetensors")

    def _save_router_and_index(self, path: Path) -> None:
        save_router_examples(self.router_examples, path / ROUTER_PROMPTS)
        index = {"domains": self.domains, "adapters": self.adapters, "router_adapter": ROUTER}
        atomic_write_text(path / ARLISS_FILE, json.dumps(index, indent=2))

    def save_components(self, path: Path) -> None:
        self._save_adapters(path, [*self.adapters.values(), ROUTER])
        self._save_router_and_index(path)

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "ARLISSSystem":
        index = json.loads((path / ARLISS_FILE).read_text())
        domains: list[str] = index["domains"]
        adapters: dict[str, str] = index["adapters"]
        m = config.model
        backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
        names = [adapters[d] for d in domains] + [ROUTER]
        # is_trainable keeps the adapters trainable so `add_domain` can run on a loaded system.
        backbone.model = PeftModel.from_pretrained(backbone.model, str(path / "adapters" / names[0]),
                                                   adapter_name=names[0], is_trainable=True)
        for name in names[1:]:
            backbone.model.load_adapter(str(path / "adapters" / name), adapter_name=name, is_trainable=True)
        system = cls(config, domains=domains, examples=load_router_examples(path / ROUTER_PROMPTS))
        heads: dict[str, nn.Module] = {}
        for name in names[:-1]:
            heads[name] = system._new_head(backbone.hidden_size)
            heads[name].load_state_dict(load_file(str(path / "heads" / f"{name}.safetensors")))
        router_head = nn.Linear(backbone.hidden_size, len(domains))
        router_head.load_state_dict(load_file(str(path / "heads" / f"{ROUTER}.safetensors")))
        system.model = ARLISSModel(backbone, heads, router_head)
        if device is not None:
            system.model.to(device)
        system.model.eval()
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["domains"] = self.domains
        info["adapters"] = self.adapters
        return info
