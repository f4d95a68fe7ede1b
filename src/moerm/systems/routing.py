"""What routed systems (RODOS, ARLISS) share: router training data, the cross-entropy step, routing decisions
with a confidence fallback, and the prompts a router was trained on (kept so `add-domain` can retrain it alone).
"""

from __future__ import annotations

import gzip
import re
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from moerm.config import RunConfig, TrainConfig
from moerm.data.schema import PreferencePair
from moerm.encoding import Backbone, PairEncoder, backbone_kwargs, load_backbone, make_encoder
from moerm.encoding.cache import frozen_features
from moerm.errors import UserError
from moerm.encoding.tuning import apply_tuning, restore_adapters, save_backbone, saved_backbone_path
from moerm.modules.router import DomainClassifier
from moerm.systems.components import ComponentFit, fit_component
from moerm.train.checkpoint import atomic_save_safetensors
from moerm.inference import sorted_batches
from moerm.train import distributed

ROUTER_PROMPTS = "router_prompts.jsonl.gz"
# A router's train settings over the run's `train` (components.router.train overrides them): a linear classifier on
# (cached or tuned) prompt features learns in a few epochs at a head's learning rate.
ROUTER_DEFAULTS = {"lr": 1e-3, "head_lr": None, "epochs": 3.0, "max_steps": None}  # head_lr None: = lr


@dataclass
class RouterOptions:
    """Options shared by routed systems (set with --set options.KEY=VALUE)."""

    router_tuning: str = "frozen"  # frozen: cached prompt features + linear classifier; full: fine-tune a backbone; lora: LoRA + classifier
    min_confidence: float = 0.0  # below it the router's choice is not trusted: fall back
    fallback: str = "mixture"  # mixture: probability-weighted sum of the domain RMs; general: an RM on all domains
    max_router_prompts_per_domain: int = 2000
    router_max_length: int = 32  # the router reads the prompt's first tokens only: domain cues sit there, and it is cheap

    def __post_init__(self) -> None:
        if self.router_tuning not in ("frozen", "full", "lora"):
            raise UserError(f"options.router_tuning must be frozen, full or lora; got {self.router_tuning!r}")
        if self.fallback not in ("mixture", "general"):
            raise UserError(f"options.fallback must be 'mixture' or 'general'; got {self.fallback!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError("options.min_confidence must be within [0, 1]")


def domain_dir(domain: str) -> str:
    """A folder name for a domain: readable when safe, with a short hash so names never collide."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", domain)[:60]
    return safe if safe == domain else f"{safe}-{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


def router_examples(pairs: Sequence[PreferencePair], cap_per_domain: int) -> list[tuple[str, str]]:
    """Distinct (prompt, domain) examples, at most `cap_per_domain` per domain, in first-seen order."""
    seen: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    out = []
    for p in pairs:
        key = (p.prompt, p.domain)
        if key in seen or counts.get(p.domain, 0) >= cap_per_domain:
            continue
        seen.add(key)
        counts[p.domain] = counts.get(p.domain, 0) + 1
        out.append(key)
    return out


def router_files(version: int) -> dict[str, str]:
    """Where router version `version` is saved, relative to the model folder: version 0 at the original names,
    each `add-domain` at new ones. The index file names the version in use and is written last, so a killed
    add-domain leaves the old router (and the old index) whole, and a second add-domain simply runs again."""
    sfx = "" if version == 0 else f"-v{version}"
    return {"dir": f"router{sfx}", "prompts": ROUTER_PROMPTS if version == 0 else f"router_prompts{sfx}.jsonl.gz",
            "head": f"router{sfx}.safetensors"}


def remove_router_files(path: Path, version: int, where: dict[str, str] | None = None) -> None:
    """Delete one router version's files. `where` maps a key of `router_files` to the sub-folder it lives in
    (RODOS: the router folder and prompts at the top; ARLISS: {"dir": "adapters", "head": "heads", "prompts": ""})."""
    import shutil

    files = router_files(version)
    for key, sub in (where or {"dir": "", "prompts": ""}).items():
        target = path / sub / files[key] if sub else path / files[key]
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()


def require_routes(routes: Sequence[str], system: str, what: str = "domains") -> None:
    """A router needs at least two classes to choose between: one domain is an error, not a 1-class router."""
    if len(set(routes)) < 2:
        raise UserError(f"{system} routes between {what} and needs at least two; the training data has "
                        f"{len(set(routes))} ({', '.join(sorted(set(routes))) or 'none'}). Add another domain's data, "
                        "or train a baseline")


def new_domain_of(pairs: Sequence[PreferencePair], existing: Sequence[str]) -> str:
    """The one domain `add-domain` was given; an error when the pairs hold several, or a domain already served."""
    domains = {p.domain for p in pairs}
    if len(domains) != 1:
        raise UserError(f"add-domain takes the pairs of one new domain; got {sorted(domains)}")
    (domain,) = domains
    if domain in existing:
        raise UserError(f"domain {domain!r} already has a reward model; choose a new domain name")
    return domain


def save_router_examples(examples: Sequence[tuple[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for prompt, domain in examples:
            f.write(json.dumps({"prompt": prompt, "domain": domain}) + "\n")
    tmp.replace(path)


def load_router_examples(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(r["prompt"], r["domain"]) for r in map(json.loads, f)]


@dataclass
class PromptTexts:
    """Tokenised prompts with integer domain labels, for training a router with cross-entropy."""

    items: list[dict[str, Any]]
    encoder: PairEncoder

    @classmethod
    def build(cls, examples: Sequence[tuple[str, str]], domains: Sequence[str], encoder: PairEncoder) -> "PromptTexts":
        index = {d: i for i, d in enumerate(domains)}
        return cls([{"enc": encoder.encode_single(p), "label": index[d]} for p, d in examples], encoder)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def lengths(self) -> list[int]:
        """Per item, its prompt's token count (for `train.group_by_length`)."""
        return [len(it["enc"]["input_ids"]) for it in self.items]

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.encoder.pad([b["enc"] for b in batch])  # (B, T)
        enc["labels"] = torch.tensor([b["label"] for b in batch])  # (B,)
        return enc


@dataclass
class FeatureTexts:
    """Cached prompt features (N, H) with labels, for a frozen-backbone router."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        ix = torch.tensor(idx)
        return {"features": self.features[ix], "labels": self.labels[ix]}


def classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on raw logits (never on softmaxed outputs)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs)  # (B, D)
    loss = F.cross_entropy(logits, batch["labels"])
    return loss, {"accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}


@torch.no_grad()
def classification_eval(model: nn.Module, data: PromptTexts | FeatureTexts, batch_size: int = 64) -> dict[str, float]:
    """Router accuracy on `data`; under a multi-process launch each process classifies its shard (then gathered)."""
    device = next(model.parameters()).device
    mine = distributed.shard(len(data))
    local: list[bool] = []
    for s in range(0, len(mine), batch_size):
        batch = data.collate([data[i] for i in mine[s : s + batch_size]])
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        local += (model(**inputs).argmax(-1).cpu() == batch["labels"]).tolist()
    rows = distributed.gather_rows(local, len(data))
    return {"accuracy": sum(rows) / len(rows) if rows else float("nan")}


@torch.no_grad()
def prompt_probs(prompts: Sequence[str], encoder: PairEncoder, logits: Callable[[list[dict[str, list[int]]]], torch.Tensor],
                 num_domains: int, batch_size: int) -> torch.Tensor:
    """(N, D) routing probabilities; each distinct prompt is classified once, in length-sorted batches.

    `logits(encoded_rows)` maps a list of single-text encodings to (b, D) router logits.
    """
    unique = list(dict.fromkeys(prompts))
    encoded = [encoder.encode_single(p) for p in unique]
    out = torch.empty(len(unique), num_domains)
    for idx in sorted_batches(encoded, batch_size):
        out[torch.tensor(idx)] = torch.softmax(logits([encoded[i] for i in idx]).float(), -1).cpu()  # (b, D)
    pos = {p: i for i, p in enumerate(unique)}
    return out[torch.tensor([pos[p] for p in prompts], dtype=torch.long)] if prompts else out


@dataclass
class Route:
    """Where one input goes: a domain RM, or the fallback (domain None)."""

    domain: str | None
    probs: dict[str, float]
    source: str  # "router", "given" (the caller named a known domain) or "fallback"
    reason: str | None = None

    def details(self) -> dict[str, Any]:
        top = max(self.probs, key=self.probs.get) if self.probs else None
        return {"routed_domain": self.domain, "router_top": top,
                "router_confidence": self.probs.get(top, None) if top else None,
                "router_probs": self.probs, "route_source": self.source,
                "fallback": self.source == "fallback", "fallback_reason": self.reason}


def decide_routes(probs: torch.Tensor, domains: Sequence[str], hints: Sequence[str | None] | None,
                  min_confidence: float) -> list[Route]:
    """Top-1 routing with a confidence floor; a caller's known domain wins, an unknown one falls back.

    Args:
        probs: (N, D) router probabilities (softmax of its logits).
        domains: the D domain names, in the router's label order.
        hints: optional per-input domain given by the caller.
    """
    routes = []
    for i in range(probs.shape[0]):
        p = {d: float(probs[i, j]) for j, d in enumerate(domains)}
        hint = hints[i] if hints is not None else None
        if hint is not None:
            if hint in p:
                routes.append(Route(hint, p, "given"))
            else:
                routes.append(Route(None, p, "fallback", f"domain {hint!r} has no reward model"))
            continue
        j = int(probs[i].argmax())
        if float(probs[i, j]) < min_confidence:
            routes.append(Route(None, p, "fallback", f"router confidence {float(probs[i, j]):.2f} < {min_confidence}"))
        else:
            routes.append(Route(domains[j], p, "router"))
    return routes


def combine_rewards(routes: Sequence[Route], per_domain: Callable[[str, list[int]], torch.Tensor], n: int,
                    general: Callable[[list[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """Rewards (n,): each routed input from its domain RM; a fallback input from the `general` RM when given, else
    as the probability-weighted mixture of every domain RM. `per_domain(domain, rows)` scores the given rows with
    that domain's RM, one sub-batch per RM.
    """
    rewards = torch.zeros(n)
    fallback_rows = [i for i, r in enumerate(routes) if r.domain is None]
    if general is not None and fallback_rows:
        rewards[torch.tensor(fallback_rows)] = general(fallback_rows).float()
    need: dict[str, list[int]] = {}
    for i, r in enumerate(routes):
        if r.domain is None and general is not None:
            continue
        for d in ([r.domain] if r.domain is not None else list(r.probs)):
            need.setdefault(d, []).append(i)
    for d, rows in need.items():
        scores = per_domain(d, rows)  # (len(rows),)
        for i, s in zip(rows, scores.tolist()):
            r = routes[i]
            rewards[i] += s if r.domain is not None else r.probs[d] * s
    return rewards


class Router:
    """A DomainClassifier over prompts: on a frozen backbone (cached features), fine-tuned fully, or with LoRA."""

    def __init__(self, config: RunConfig, opts: RouterOptions, domains: list[str], backbone: Backbone | None = None):
        self.config, self.opts, self.domains = config, opts, list(domains)
        m = config.model
        if backbone is None:
            backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
            apply_tuning(backbone, opts.router_tuning, m)  # lora: only the adapter and the classifier train
        elif opts.router_tuning == "frozen":
            backbone.requires_grad_(False)
        self.backbone = backbone
        self.model = DomainClassifier(self.backbone, self.backbone.hidden_size, len(self.domains))
        self.encoder = make_encoder(m.backbone, opts.router_max_length)
        self.eval_accuracy: float | None = None  # on held-out prompts, set by `fit` when it had some

    def _features(self, examples: Sequence[tuple[str, str]], ctx: Any, desc: str) -> FeatureTexts:
        feats = frozen_features(self.backbone, self.encoder, self.config.model, [p for p, _ in examples], None,
                                self.config.train.eval_batch_size, desc, ctx.progress)  # (N, H)
        index = {d: i for i, d in enumerate(self.domains)}
        return FeatureTexts(feats, torch.tensor([index[d] for _, d in examples], dtype=torch.long))

    def fit(self, examples: Sequence[tuple[str, str]], out_dir: Path, ctx: Any, train_cfg: TrainConfig,
            eval_examples: Sequence[tuple[str, str]] = ()) -> ComponentFit:
        """Train on `examples`; `eval_examples` (held-out prompts, unknown domains dropped) give its eval accuracy."""
        held_out = [(p, d) for p, d in eval_examples if d in self.domains]
        if self.opts.router_tuning == "frozen":
            data: PromptTexts | FeatureTexts = self._features(examples, ctx, "features (router)")
            eval_data = self._features(held_out, ctx, "features (router eval)") if held_out else None
            module: nn.Module = DomainClassifier(None, self.backbone.hidden_size, len(self.domains))
            module.classifier = self.model.classifier
            groups = [(self.model.classifier, train_cfg.head_lr or train_cfg.lr)]
        else:
            data = PromptTexts.build(examples, self.domains, self.encoder)
            eval_data = PromptTexts.build(held_out, self.domains, self.encoder) if held_out else None
            module = self.model
            groups = [(self.backbone, train_cfg.lr), (self.model.classifier, train_cfg.head_lr or train_cfg.lr)]
        fit = fit_component("router", module, data, train_cfg, ctx, out_dir, groups, eval_data, kind="classification")
        self.model.to(distributed.device())
        self.eval_accuracy = fit.metrics.get("eval_accuracy")
        return fit

    def probs(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) routing probabilities; each distinct prompt is classified once."""
        self.model.eval()
        device = next(self.model.parameters()).device

        def logits(rows: list[dict[str, list[int]]]) -> torch.Tensor:
            return self.model(**{k: v.to(device) for k, v in self.encoder.pad(rows).items()})  # (b, D)

        return prompt_probs(prompts, self.encoder, logits, len(self.domains), batch_size)

    def save(self, path: Path) -> None:
        atomic_save_safetensors(self.model.classifier.state_dict(), path / "classifier.safetensors")
        save_backbone(self.backbone, self.opts.router_tuning, path, self.encoder.tokenizer)

    @classmethod
    def load(cls, path: Path, config: RunConfig, opts: RouterOptions, domains: list[str]) -> "Router":
        m = config.model
        backbone = load_backbone(saved_backbone_path(opts.router_tuning, path, m.backbone), m.pooling,
                                 **backbone_kwargs(config))
        restore_adapters(backbone, opts.router_tuning, path, trainable=False)
        router = cls(config, opts, domains, backbone=backbone)
        router.model.classifier.load_state_dict(load_file(str(path / "classifier.safetensors")))
        return router
