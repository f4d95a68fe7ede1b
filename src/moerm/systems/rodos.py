"""RODOS (Namgoong et al. 2024): an external router picks one of several domain-specific reward models.

Each domain RM is a full `baseline` RM trained only on its domain's pairs; the router is a separate sequence
classifier over the prompt. A new domain means one new RM and a retrained router (`add_domain`), nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from moerm.backbone import Backbone, backbone_id, backbone_kwargs, load_backbone, make_encoder
from moerm.config import RunConfig
from moerm.data.schema import PreferencePair
from moerm.features import FeatureCache, encode_features
from moerm.modules.router import DomainClassifier
from moerm.systems.base import SYSTEM_FILE, FitContext, FitResult, RewardSystem, ScoreOutput, load_system, register
from moerm.systems.baseline import BaselineSystem, lora_config
from moerm.systems.routing import (
    ROUTER_PROMPTS, FeatureTexts, PromptTexts, RouterOptions, classification_eval, classification_step,
    combine_rewards, decide_routes, load_router_examples, new_domain_of, prompt_probs, router_examples,
    save_router_examples,
)
from moerm.train import distributed
from moerm.train.checkpoint import atomic_save_safetensors, atomic_write_text
from moerm.train.trainer import Trainer

RODOS_FILE = "rodos.json"
GENERAL_DIR = "general_rm"  # the general fallback RM (options.fallback=general), beside rms/, never a domain name


@dataclass
class RODOSOptions(RouterOptions):
    """Router options; the domain RMs use the run's model/train config (tuning auto = full)."""


def domain_dir(domain: str) -> str:
    """A folder name for a domain: readable when safe, with a short hash so names never collide."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:60]
    return safe if safe == domain else f"{safe}-{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


class Router:
    """A DomainClassifier over prompts: on a frozen backbone (cached features), fine-tuned fully, or with LoRA."""

    def __init__(self, config: RunConfig, opts: RODOSOptions, domains: list[str], backbone: Backbone | None = None):
        self.config, self.opts, self.domains = config, opts, list(domains)
        m = config.model
        self.backbone = backbone if backbone is not None else load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
        if opts.router_tuning == "frozen":
            self.backbone.requires_grad_(False)
        elif opts.router_tuning == "lora" and not isinstance(self.backbone.model, PeftModel):
            self.backbone.model = get_peft_model(self.backbone.model, lora_config(config))  # only LoRA + classifier train
        self.model = DomainClassifier(self.backbone, self.backbone.hidden_size, len(self.domains))
        self.encoder = make_encoder(m.backbone, opts.router_max_length)
        self.eval_accuracy: float | None = None  # on held-out prompts, set by `fit` when it had some

    def _features(self, examples: Sequence[tuple[str, str]], ctx: FitContext, desc: str) -> FeatureTexts:
        cache = FeatureCache(self.config.model.feature_cache, backbone_id(self.config.model.backbone, self.config.model.dtype),
                             self.opts.router_max_length, self.backbone.pooling)
        self.backbone.to(distributed.device())
        with distributed.main_first():  # the main process fills the cache; the others then read it
            feats = encode_features(self.backbone, self.encoder, [p for p, _ in examples], None,
                                    self.config.train.eval_batch_size, cache, desc=desc, progress=ctx.progress)
        index = {d: i for i, d in enumerate(self.domains)}
        return FeatureTexts(feats, torch.tensor([index[d] for _, d in examples], dtype=torch.long))

    def fit(self, examples: Sequence[tuple[str, str]], out_dir: Path, ctx: FitContext,
            eval_examples: Sequence[tuple[str, str]] = ()) -> float:
        """Train on `examples`; `eval_examples` (held-out prompts, unknown domains dropped) give its eval accuracy."""
        t_cfg = dataclasses.replace(self.config.train, lr=self.opts.router_lr, head_lr=self.opts.router_lr,
                                    epochs=self.opts.router_epochs, max_steps=None)
        held_out = [(p, d) for p, d in eval_examples if d in self.domains]
        if self.opts.router_tuning == "frozen":
            data: PromptTexts | FeatureTexts = self._features(examples, ctx, "features (router)")
            eval_data = self._features(held_out, ctx, "features (router eval)") if held_out else None
            module: nn.Module = DomainClassifier(None, self.backbone.hidden_size, len(self.domains))
            module.classifier = self.model.classifier
            groups = [(self.model.classifier, self.opts.router_lr)]
        else:
            data = PromptTexts.build(examples, self.domains, self.encoder)
            eval_data = PromptTexts.build(held_out, self.domains, self.encoder) if held_out else None
            module = self.model
            groups = [(self.backbone, self.opts.router_lr), (self.model.classifier, self.opts.router_lr)]
        trainer = Trainer(module, classification_step, data, data.collate, t_cfg, out_dir, groups,
                          eval_fn=(lambda m: classification_eval(m, eval_data)) if eval_data is not None else None,
                          desc="router", progress=ctx.progress, stop_after_steps=ctx.stop_after_steps)
        result = trainer.train(resume=ctx.resume)
        self.model.to(trainer.accelerator.device)
        self.eval_accuracy = result.final_metrics.get("eval_accuracy")
        return result.seconds

    def probs(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) routing probabilities; each distinct prompt is classified once."""
        self.model.eval()
        device = next(self.model.parameters()).device

        def logits(rows: list[dict[str, list[int]]]) -> torch.Tensor:
            return self.model(**{k: v.to(device) for k, v in self.encoder.pad(rows).items()})  # (b, D)

        return prompt_probs(prompts, self.encoder, logits, len(self.domains), batch_size)

    def save(self, path: Path) -> None:
        atomic_save_safetensors(self.model.classifier.state_dict(), path / "classifier.safetensors")
        if self.opts.router_tuning == "full":
            self.backbone.model.save_pretrained(path / "backbone", safe_serialization=True)
            self.encoder.tokenizer.save_pretrained(path / "backbone")
        elif self.opts.router_tuning == "lora":  # only the adapter: the base is config.model.backbone
            self.backbone.model.save_pretrained(str(path / "adapter"), safe_serialization=True)

    @classmethod
    def load(cls, path: Path, config: RunConfig, opts: RODOSOptions, domains: list[str]) -> "Router":
        m = config.model
        backbone = load_backbone(str(path / "backbone") if opts.router_tuning == "full" else m.backbone, m.pooling,
                                **backbone_kwargs(config))
        if opts.router_tuning == "lora":
            backbone.model = PeftModel.from_pretrained(backbone.model, str(path / "adapter"))
        router = cls(config, opts, domains, backbone=backbone)
        router.model.classifier.load_state_dict(load_file(str(path / "classifier.safetensors")))
        return router


@register
class RODOSSystem(RewardSystem):
    """Router + one full RM per domain; a batch is grouped by routed domain, one sub-batch per RM."""

    name = "rodos"
    options_class = RODOSOptions

    def __init__(self, config: RunConfig, rms: dict[str, BaselineSystem] | None = None, router: Router | None = None):
        super().__init__(config)
        self.opts: RODOSOptions = self.options
        self.rms: dict[str, BaselineSystem] = dict(rms or {})
        self.general: BaselineSystem | None = None  # options.fallback=general: one RM trained on every domain
        self.router = router
        self.router_examples: list[tuple[str, str]] = []

    @property
    def domains(self) -> list[str]:
        return sorted(self.rms)

    def _rm_config(self) -> RunConfig:
        m = self.config.model
        tuning = "full" if m.tuning == "auto" else m.tuning
        return dataclasses.replace(self.config, system="baseline", options={},
                                   model=dataclasses.replace(m, tuning=tuning))

    def _train_rm(self, domain: str | None, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None,
                  ctx: FitContext) -> tuple[BaselineSystem, float, dict[str, float]]:
        """One domain's RM on that domain's pairs; `domain=None` trains the general fallback RM on all of them."""
        rm = BaselineSystem(self._rm_config())
        folder = f"rm-{domain_dir(domain)}" if domain is not None else GENERAL_DIR
        sub = FitContext(ctx.out_dir / "components" / folder, ctx.resume, ctx.progress, ctx.stop_after_steps)
        t0 = time.perf_counter()
        keep = (lambda p: True) if domain is None else (lambda p: p.domain == domain)
        result = rm.fit([p for p in train if keep(p)], [p for p in eval if keep(p)] if eval else None, sub)
        return rm, time.perf_counter() - t0, result.metrics

    def _train_router(self, ctx: FitContext, eval: Sequence[PreferencePair] | None = None) -> float:
        self.router = Router(self.config, self.opts, self.domains)
        t0 = time.perf_counter()
        held_out = router_examples(eval, self.opts.max_router_prompts_per_domain) if eval else []
        self.router.fit(self.router_examples, ctx.out_dir / "components" / "router", ctx, held_out)
        return time.perf_counter() - t0

    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        seconds: dict[str, float] = {}
        metrics: dict[str, float] = {}
        for domain in sorted({p.domain for p in train}):
            self.rms[domain], seconds[f"rm:{domain}"], m = self._train_rm(domain, train, eval, ctx)
            # each RM on its own domain's held-out pairs (oracle routing); `moerm eval` measures the routed system
            metrics.update({f"rm:{domain}:{k}": v for k, v in m.items() if k.startswith("eval_accuracy")})
        if self.opts.fallback == "general":
            self.general, seconds["rm:general"], _ = self._train_rm(None, train, None, ctx)
        self.router_examples = router_examples(train, self.opts.max_router_prompts_per_domain)
        seconds["router"] = self._train_router(ctx, eval)
        if self.router is not None and self.router.eval_accuracy is not None:  # on held-out prompts, never training ones
            metrics["router:eval_accuracy"] = self.router.eval_accuracy
        return FitResult(metrics, seconds)

    def add_domain(self, pairs: Sequence[PreferencePair], ctx: FitContext, model_dir: Path) -> FitResult:
        domain = new_domain_of(pairs, list(self.rms))
        seconds: dict[str, float] = {}
        self.rms[domain], seconds[f"rm:{domain}"], _ = self._train_rm(domain, pairs, None, ctx)
        self.router_examples += router_examples(pairs, self.opts.max_router_prompts_per_domain)
        seconds["router"] = self._train_router(ctx)
        # Write only what changed: the new RM, the router, the index files. Other RMs' files stay byte-identical.
        self.rms[domain].save(model_dir / "rms" / domain_dir(domain))
        self._save_router_and_index(model_dir)
        self._write_system_file(model_dir)
        return FitResult({}, seconds)

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        if self.router is None:
            raise RuntimeError("RODOS has no router yet: fit or load it first")
        probs = self.router.probs(prompts, batch_size)  # (N, D)
        routes = decide_routes(probs, self.router.domains, domains, self.opts.min_confidence)

        def per_domain(domain: str, rows: list[int]) -> torch.Tensor:
            rm = self.rms[domain]
            return torch.tensor(rm.score([prompts[i] for i in rows], [responses[i] for i in rows],
                                         batch_size=batch_size).rewards)

        general = None
        if self.general is not None:
            g = self.general

            def general(rows: list[int]) -> torch.Tensor:
                return torch.tensor(g.score([prompts[i] for i in rows], [responses[i] for i in rows],
                                            batch_size=batch_size).rewards)

        rewards = combine_rewards(routes, per_domain, len(prompts), general)
        fallback_to = "general" if self.general is not None else "mixture"
        return ScoreOutput(rewards.tolist(), [{"system": self.name, **r.details(),
                                               **({"fallback_to": fallback_to} if r.domain is None else {})}
                                              for r in routes])

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
        files["router"] = ["router"]
        return files

    def _save_router_and_index(self, path: Path) -> None:
        assert self.router is not None
        self.router.save(path / "router")
        save_router_examples(self.router_examples, path / ROUTER_PROMPTS)
        index = {"domains": self.router.domains, "dirs": {d: domain_dir(d) for d in self.rms}}
        atomic_write_text(path / RODOS_FILE, json.dumps(index, indent=2))

    def _write_system_file(self, path: Path) -> None:
        meta = {"system": self.name, "format": 1, "config": self.config.to_dict()}
        atomic_write_text(path / SYSTEM_FILE, json.dumps(meta, indent=2))

    def save_components(self, path: Path) -> None:
        for d, rm in self.rms.items():
            rm.save(path / "rms" / domain_dir(d))
        if self.general is not None:
            self.general.save(path / GENERAL_DIR)
        self._save_router_and_index(path)

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "RODOSSystem":
        index = json.loads((path / RODOS_FILE).read_text())
        rms = {d: load_system(path / "rms" / sub, device) for d, sub in index["dirs"].items()}
        system = cls(config, rms=rms)  # type: ignore[arg-type]
        system.router = Router.load(path / "router", config, system.opts, index["domains"])
        if device is not None:
            system.router.model.to(device)
        system.router_examples = load_router_examples(path / ROUTER_PROMPTS)
        if (path / GENERAL_DIR / SYSTEM_FILE).exists():
            system.general = load_system(path / GENERAL_DIR, device)  # type: ignore[assignment]
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["domains"] = self.domains
        return info
