"""What routed systems (RODOS, ARLISS, DMoERM) share: router training data, the cross-entropy step, routing
decisions (hard top-1, a soft top-k mix, or top-1 gated by confidence), an out-of-distribution detector on the
router's prompt features, the fallback, and the prompts a router was trained on (kept so `add-domain` can retrain it
alone).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from moerm.config import RunConfig, TrainConfig
from moerm.data.schema import PreferencePair
from moerm.encoding import Backbone, PairEncoder, backbone_kwargs, load_backbone, make_encoder
from moerm.encoding.backbone import pooled
from moerm.encoding.cache import frozen_features
from moerm.errors import UserError
from moerm.encoding.trunk import compute_trunk
from moerm.encoding.tuning import apply_tuning, restore_adapters, save_backbone, saved_backbone_path, set_trunk
from moerm.modules.router import DomainClassifier
from moerm.systems.components import ComponentFit, fit_component
from moerm.train.checkpoint import atomic_save_safetensors
from moerm.inference import sorted_batches
from moerm.train import distributed

ROUTER_PROMPTS = "router_prompts.jsonl.gz"
# A router's train settings over the run's `train` (components.router.train overrides them): a linear classifier on
# (cached or tuned) prompt features learns in a few epochs at a head's learning rate.
ROUTER_DEFAULTS = {"lr": 1e-3, "head_lr": None, "epochs": 3.0, "max_steps": None}  # head_lr None: = lr
ROUTING_MODES = ("hard", "soft", "gated")
OOD_KINDS = ("none", "entropy", "knn", "mahalanobis")
ROUTER_TUNINGS = ("frozen", "full", "lora", "trunk")
OOD_FILES = {"json": "ood.json", "tensors": "ood.safetensors"}  # inside the router folder: versioned with it


@dataclass
class RouterOptions:
    """Options shared by routed systems (set with --set options.KEY=VALUE)."""

    # frozen: cached prompt features + linear classifier; full: fine-tune a backbone; lora: LoRA + classifier; trunk: a
    # linear classifier on the mean of the prompt's states at the output of the frozen trunk (the pretrained lower
    # blocks below the top model.trainable_layers: the trunk of `top` tuning), cheaper than the frozen router's pass
    router_tuning: str = "frozen"
    # frozen router: read the prompt's pretrained states after this many blocks (their mean; only those blocks run)
    # instead of the whole backbone's pooled output (None)
    router_layer: int | None = None
    min_confidence: float = 0.0  # below it the router's choice is not trusted: fall back
    fallback: str = "mixture"  # mixture: probability-weighted sum of the domain RMs; general: an RM on all domains
    max_router_prompts_per_domain: int = 2000
    router_max_length: int = 32  # the router reads the prompt's first tokens only: domain cues sit there, and it is cheap
    # hard: the top-1 domain RM (below min_confidence: the fallback); soft: the router-probability-weighted mix of the
    # top `routing_top_k` domain RMs, renormalised over them; gated: top-1 when its probability >= min_confidence,
    # else that soft mix (a routing decision, not a fallback)
    routing: str = "hard"
    routing_top_k: int = 2  # soft/gated: how many domain RMs the mix takes (0: all of them)
    # Out-of-distribution prompts (domains the router never saw) go to the fallback, flagged `ood: true`. entropy:
    # the router's normalised entropy; knn: 1 - cosine similarity of the prompt's router features to the nearest
    # training prompt; mahalanobis: squared distance to the nearest domain mean (shared covariance). The threshold
    # flags `ood_quantile` of held-out in-domain prompts (of the training prompts when there are none).
    ood: str = "none"
    ood_quantile: float = 0.05

    def __post_init__(self) -> None:
        if self.router_tuning not in ROUTER_TUNINGS:
            raise UserError(f"options.router_tuning must be frozen, full, lora or trunk; got {self.router_tuning!r}")
        if self.router_layer is not None and (isinstance(self.router_layer, bool) or not isinstance(
                self.router_layer, int) or self.router_layer < 1):
            raise UserError(f"options.router_layer must be an integer >= 1 (or unset); got {self.router_layer!r}")
        if self.fallback not in ("mixture", "general"):
            raise UserError(f"options.fallback must be 'mixture' or 'general'; got {self.fallback!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError("options.min_confidence must be within [0, 1]")
        if self.routing not in ROUTING_MODES:
            raise UserError(f"options.routing must be hard, soft or gated; got {self.routing!r}")
        if self.routing == "gated" and self.min_confidence <= 0.0:
            raise UserError("options.routing=gated needs options.min_confidence > 0: top-1 at or above it, the top-k "
                            "mix below it")
        if isinstance(self.routing_top_k, bool) or not isinstance(self.routing_top_k, int) or self.routing_top_k < 0:
            raise UserError(f"options.routing_top_k must be an integer >= 0 (0: every domain); got {self.routing_top_k!r}")
        if self.ood not in OOD_KINDS:
            raise UserError(f"options.ood must be one of {', '.join(OOD_KINDS)}; got {self.ood!r}")
        if not 0.0 < self.ood_quantile < 0.5:
            raise UserError("options.ood_quantile must be within (0, 0.5)")


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

    @classmethod
    def labelled(cls, features: torch.Tensor, examples: Sequence[tuple[str, str]],
                 domains: Sequence[str]) -> "FeatureTexts":
        """Features (N, H) of (prompt, domain) examples, labelled by each domain's index in `domains`."""
        index = {d: i for i, d in enumerate(domains)}
        return cls(features, torch.tensor([index[d] for _, d in examples], dtype=torch.long))

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
def prompt_outputs(prompts: Sequence[str], encoder: PairEncoder,
                   features: Callable[[list[dict[str, list[int]]]], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor],
                   num_domains: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) routing probabilities and (N, H) router features; each distinct prompt is encoded once, in
    length-sorted batches.

    `features(encoded_rows)` maps a list of single-text encodings to (b, H) features, `head` those to (b, D) logits.
    """
    unique = list(dict.fromkeys(prompts))
    encoded = [encoder.encode_single(p) for p in unique]
    probs = torch.empty(len(unique), num_domains)
    feats: torch.Tensor | None = None
    for idx in sorted_batches(encoded, batch_size):
        f = features([encoded[i] for i in idx])  # (b, H)
        if feats is None:
            feats = torch.empty(len(unique), f.shape[-1])
        feats[torch.tensor(idx)] = f.float().cpu()
        probs[torch.tensor(idx)] = torch.softmax(head(f).float(), -1).cpu()  # (b, D)
    feats = feats if feats is not None else torch.empty(0, 0)
    if not prompts:
        return probs, feats
    where = {p: i for i, p in enumerate(unique)}
    pos = torch.tensor([where[p] for p in prompts], dtype=torch.long)
    return probs[pos], feats[pos]


def early_features(backbone: Backbone, encoder: PairEncoder, rows: Sequence[dict[str, list[int]]],
                   blocks: int) -> torch.Tensor:
    """(b, H) frozen-router features of encoded prompts: the mean over each prompt's tokens of its pretrained states
    after the first `blocks` blocks (`Backbone.early_states`: only they run, adapters off)."""
    device = next(backbone.parameters()).device
    batch = {k: v.to(device) for k, v in encoder.pad(rows).items()}  # (b, T)
    was_training = backbone.training
    backbone.eval()
    try:
        states = backbone.early_states(blocks, batch["input_ids"], batch["attention_mask"],
                                       batch.get("token_type_ids"))  # (b, T, H)
    finally:
        backbone.train(was_training)
    return pooled(states, batch["attention_mask"], "mean")


def prompt_probs(prompts: Sequence[str], encoder: PairEncoder, logits: Callable[[list[dict[str, list[int]]]], torch.Tensor],
                 num_domains: int, batch_size: int) -> torch.Tensor:
    """(N, D) routing probabilities; `logits(encoded_rows)` maps single-text encodings to (b, D) router logits."""
    return prompt_outputs(prompts, encoder, logits, lambda x: x, num_domains, batch_size)[0]


class OODDetector:
    """Flags prompts unlike the router's training prompts. `scores` is higher the further out a prompt is; a prompt
    is out of distribution when its score is above `threshold`, set by `calibrate` so that a share `quantile` of
    in-domain calibration prompts is above it.

    Kinds: `entropy` (the router's entropy over its D domains, divided by log D), `knn` (1 - cosine similarity to the
    nearest training prompt's features; Sun et al. 2022), `mahalanobis` (the squared Mahalanobis distance to the
    nearest domain mean under one shared covariance; Lee et al. 2018).
    """

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor] | None = None, threshold: float = float("nan"),
                 info: dict[str, Any] | None = None):
        if kind not in OOD_KINDS or kind == "none":
            raise ValueError(f"unknown OOD detector kind {kind!r}")
        self.kind, self.tensors, self.threshold = kind, dict(tensors or {}), float(threshold)
        self.info: dict[str, Any] = dict(info or {})

    @classmethod
    def fit(cls, kind: str, feats: torch.Tensor, labels: torch.Tensor, num_domains: int) -> "OODDetector":
        """What the detector keeps of the training prompts: their (N, H) features and (N,) domain labels."""
        feats = feats.float()
        if kind == "knn":
            return cls(kind, {"train": F.normalize(feats, dim=-1).contiguous()})
        if kind == "mahalanobis":
            means = torch.stack([feats[labels == c].mean(0) if bool((labels == c).any()) else feats.mean(0)
                                 for c in range(num_domains)])  # (D, H)
            centred = (feats - means[labels]).double()  # (N, H)
            cov = centred.T @ centred / max(1, feats.shape[0] - 1)  # (H, H), shared by the domains
            # shrinkage towards a scaled identity keeps it invertible with fewer prompts than dimensions
            shrink = 0.1 * float(torch.trace(cov)) / cov.shape[0] + 1e-8
            precision = torch.linalg.inv(cov + shrink * torch.eye(cov.shape[0], dtype=cov.dtype))
            return cls(kind, {"means": means.contiguous(), "precision": precision.float().contiguous()})
        return cls(kind)

    def scores(self, feats: torch.Tensor, probs: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
        """(N,) OOD scores from router features (N, H) and probabilities (N, D). `leave_one_out`: `feats` are the
        training prompts themselves, in the order kept by `fit` (knn then ignores each prompt's own match)."""
        if self.kind == "entropy":
            p = probs.double().clamp_min(1e-12)
            return (-(p * p.log()).sum(-1) / math.log(max(2, probs.shape[-1]))).float()
        if self.kind == "knn":
            queries, train = F.normalize(feats.float(), dim=-1), self.tensors["train"]
            best = torch.empty(queries.shape[0])
            for s in range(0, queries.shape[0], 1024):  # (b, M) similarities at a time, not (N, M)
                sims = queries[s : s + 1024] @ train.T
                if leave_one_out:
                    rows = torch.arange(sims.shape[0])
                    sims[rows, rows + s] = -2.0
                best[s : s + 1024] = sims.max(-1).values
            return 1.0 - best
        diff = feats.float()[:, None, :] - self.tensors["means"][None]  # (N, D, H)
        return torch.einsum("ndh,hk,ndk->nd", diff, self.tensors["precision"], diff).min(-1).values

    def calibrate(self, scores: torch.Tensor, quantile: float, source: str) -> None:
        """Threshold at the (1 - quantile) quantile of in-domain `scores`: `quantile` of them are flagged."""
        self.threshold = float(torch.quantile(scores.double(), 1.0 - quantile))
        self.info = {"quantile": quantile, "calibration": source, "calibration_prompts": int(scores.numel()),
                     "calibration_flagged": float((scores > self.threshold).float().mean())}

    def check(self, feats: torch.Tensor, probs: torch.Tensor) -> "OODCheck":
        scores = self.scores(feats, probs)
        return OODCheck(self.kind, scores, scores > self.threshold, self.threshold)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.tensors:
            atomic_save_safetensors(self.tensors, path / OOD_FILES["tensors"])
        meta = {"kind": self.kind, "threshold": self.threshold, **self.info}
        tmp = path / f".{OOD_FILES['json']}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path / OOD_FILES["json"])

    @classmethod
    def load(cls, path: Path) -> "OODDetector | None":
        if not (path / OOD_FILES["json"]).exists():
            return None
        meta = json.loads((path / OOD_FILES["json"]).read_text())
        tensors = load_file(str(path / OOD_FILES["tensors"])) if (path / OOD_FILES["tensors"]).exists() else {}
        kind, threshold = meta.pop("kind"), meta.pop("threshold")
        return cls(kind, tensors, threshold, meta)


@dataclass
class OODCheck:
    """Per input: the detector's score and whether it is out of distribution (score > threshold)."""

    kind: str
    scores: torch.Tensor  # (N,)
    flags: torch.Tensor  # (N,) bool
    threshold: float


@dataclass
class Route:
    """Where one input goes: the domain RMs it is scored by and their weights (one RM: `domain` names it), or the
    general RM (`general`)."""

    domain: str | None  # the one domain RM used; None for a mix or the general RM
    probs: dict[str, float]
    source: str  # "router", "given" (the caller named a known domain) or "fallback"
    reason: str | None = None
    weights: dict[str, float] = field(default_factory=dict)  # domain -> weight of its reward; empty: the general RM
    general: bool = False
    routing: str = "hard"
    ood: bool = False
    ood_score: float | None = None
    ood_threshold: float | None = None

    def details(self) -> dict[str, Any]:
        top = max(self.probs, key=self.probs.get) if self.probs else None
        out = {"routed_domain": self.domain, "router_top": top,
               "router_confidence": self.probs.get(top, None) if top else None,
               "router_probs": self.probs, "route_source": self.source,
               "fallback": self.source == "fallback", "fallback_reason": self.reason,
               "routing": self.routing, "weights": self.weights, "ood": self.ood}
        if self.ood_score is not None:
            out.update(ood_score=self.ood_score, ood_threshold=self.ood_threshold)
        return out


def top_k_weights(probs: dict[str, float], k: int) -> dict[str, float]:
    """The k most probable domains (0: all), weights renormalised to sum to 1; ties go to the earlier domain."""
    ranked = sorted(probs, key=lambda d: -probs[d])  # stable: label order among equals
    keep = ranked[: k or len(ranked)]
    total = sum(probs[d] for d in keep)
    return {d: probs[d] / total for d in keep} if total > 0 else {d: 1.0 / len(keep) for d in keep}


def decide_routes(probs: torch.Tensor, domains: Sequence[str], hints: Sequence[str | None] | None,
                  options: RouterOptions, ood: OODCheck | None = None) -> list[Route]:
    """Per input, the domain RMs that score it and their weights (`options.routing`); a caller's known domain wins;
    an unknown one, an out-of-distribution prompt (`ood`) and, in hard mode, a top-1 below `options.min_confidence`
    go to the fallback: the general RM (`options.fallback=general`), else a mixture of every domain RM, weighted by
    the router's probabilities, or equally for an out-of-distribution prompt (its router probabilities are what is
    not to be trusted).

    Args:
        probs: (N, D) router probabilities (softmax of its logits).
        domains: the D domain names, in the router's label order.
        hints: optional per-input domain given by the caller.
        ood: optional per-input out-of-distribution scores and flags.
    """
    mode, k = options.routing, options.routing_top_k
    routes = []
    for i in range(probs.shape[0]):
        p = {d: float(probs[i, j]) for j, d in enumerate(domains)}
        extra: dict[str, Any] = {"routing": mode}
        if ood is not None:
            extra.update(ood=bool(ood.flags[i]), ood_score=float(ood.scores[i]), ood_threshold=ood.threshold)

        def fallback(reason: str, equal: bool = False) -> Route:
            if options.fallback == "general":
                return Route(None, p, "fallback", reason, {}, general=True, **extra)
            weights = {d: 1.0 / len(p) for d in p} if equal else dict(p)
            return Route(None, p, "fallback", reason, weights, **extra)

        def chosen(weights: dict[str, float], reason: str | None = None) -> Route:
            one = next(iter(weights)) if len(weights) == 1 else None
            return Route(one, p, "router", reason, weights, **extra)

        hint = hints[i] if hints is not None else None
        if hint is not None:
            routes.append(Route(hint, p, "given", None, {hint: 1.0}, **extra) if hint in p
                          else fallback(f"domain {hint!r} has no reward model"))
            continue
        if ood is not None and bool(ood.flags[i]):
            routes.append(fallback(f"out of distribution: {ood.kind} score {float(ood.scores[i]):.4g} > "
                                   f"{ood.threshold:.4g}", equal=True))
            continue
        j = int(probs[i].argmax())
        confidence = float(probs[i, j])
        if mode == "soft":
            routes.append(chosen(top_k_weights(p, k)))
        elif confidence < options.min_confidence:
            reason = f"router confidence {confidence:.2f} < {options.min_confidence}"
            routes.append(chosen(top_k_weights(p, k), reason + ": top-k mix") if mode == "gated" else fallback(reason))
        else:
            routes.append(chosen({domains[j]: 1.0}))
    return routes


def combine_rewards(routes: Sequence[Route], per_domain: Callable[[str, list[int]], torch.Tensor], n: int,
                    general: Callable[[list[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """Rewards (n,): each input's `weights`-weighted sum of its domain RMs' rewards (summed in the route's own
    order, so an input's reward does not depend on the rest of the batch), or the general RM's reward.
    `per_domain(domain, rows)` scores the given rows with that domain's RM, one sub-batch per RM.
    """
    rewards = torch.zeros(n)
    general_rows = [i for i, r in enumerate(routes) if r.general]
    if general_rows:
        if general is None:
            raise RuntimeError("a route asks for the general RM, but this system has none (options.fallback=general "
                               "at training time trains it)")
        rewards[torch.tensor(general_rows)] = general(general_rows).float()
    need: dict[str, list[int]] = {}
    for i, r in enumerate(routes):
        for d in r.weights:
            need.setdefault(d, []).append(i)
    scores: dict[tuple[int, str], float] = {}
    for d, rows in need.items():
        for i, s in zip(rows, per_domain(d, rows).tolist()):  # (len(rows),)
            scores[(i, d)] = s
    for i, r in enumerate(routes):
        if not r.general:
            rewards[i] = sum(w * scores[(i, d)] for d, w in r.weights.items())
    return rewards


def rm_passes(routes: Sequence[Route]) -> float:
    """The load: reward-model passes per input (1 for a top-1 route or the general RM, k for a k-way mix)."""
    return sum(1 if r.general else len(r.weights) for r in routes) / max(1, len(routes))


def backbone_tuning(router_tuning: str) -> str:
    """How a router's own backbone is kept and saved: a trunk router's is frozen (only its classifier trains)."""
    return "frozen" if router_tuning == "trunk" else router_tuning


class Router:
    """A DomainClassifier over prompts: on a frozen backbone (cached features), fine-tuned fully, with LoRA, or on the
    frozen trunk's states (`trunk`)."""

    def __init__(self, config: RunConfig, opts: RouterOptions, domains: list[str], backbone: Backbone | None = None):
        self.config, self.opts, self.domains = config, opts, list(domains)
        m = config.model
        self.tuning = backbone_tuning(opts.router_tuning)
        if opts.router_layer is not None and opts.router_tuning != "frozen":
            raise UserError(f"options.router_layer is a frozen router's option; options.router_tuning is "
                            f"{opts.router_tuning!r}")
        if backbone is None:
            backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
            apply_tuning(backbone, self.tuning, m)  # lora: only the adapter and the classifier train
        elif self.tuning == "frozen":
            backbone.requires_grad_(False)
        if opts.router_tuning == "trunk":
            set_trunk(backbone, m)  # its features: the trunk's output, model.trainable_layers below the top
        self.backbone = backbone
        self.model = DomainClassifier(self.backbone, self.backbone.hidden_size, len(self.domains))
        self.encoder = make_encoder(m.backbone, opts.router_max_length)
        self.eval_accuracy: float | None = None  # on held-out prompts, set by `fit` when it had some
        self.detector: OODDetector | None = None  # options.ood: fitted by `fit`, saved in the router folder

    def _features(self, examples: Sequence[tuple[str, str]], ctx: Any, desc: str) -> FeatureTexts:
        prompts = [p for p, _ in examples]
        bs = self.config.train.eval_batch_size
        if self.opts.router_tuning == "trunk":
            feats = self._trunk_features([self.encoder.encode_single(p) for p in prompts], bs)
        elif self.opts.router_layer is not None:  # after a few blocks: cheap enough not to cache
            feats = prompt_outputs(prompts, self.encoder, self._early_features, self.model.classifier,
                                   len(self.domains), bs)[1]
        else:
            feats = frozen_features(self.backbone, self.encoder, self.config.model, prompts, None, bs, desc,
                                    ctx.progress)  # (N, H)
        return FeatureTexts.labelled(feats, examples, self.domains)

    def fit(self, examples: Sequence[tuple[str, str]], out_dir: Path, ctx: Any, train_cfg: TrainConfig,
            eval_examples: Sequence[tuple[str, str]] = ()) -> ComponentFit:
        """Train on `examples`; `eval_examples` (held-out prompts, unknown domains dropped) give its eval accuracy."""
        held_out = [(p, d) for p, d in eval_examples if d in self.domains]
        if self.tuning == "frozen":  # frozen and trunk: a classifier on precomputed features
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
        if self.opts.ood != "none":
            cached = isinstance(data, FeatureTexts)
            self.fit_detector(examples, held_out, data.features if cached else None,
                              eval_data.features if cached and eval_data is not None else None)
        return fit

    def fit_detector(self, examples: Sequence[tuple[str, str]], held_out: Sequence[tuple[str, str]] = (),
                     train_feats: torch.Tensor | None = None, held_out_feats: torch.Tensor | None = None,
                     kind: str | None = None) -> OODDetector:
        """The `options.ood` detector (or `kind`) from the training prompts' router features, calibrated on the
        held-out in-domain prompts, or on the training prompts themselves (knn: leave-one-out) without any.
        `*_feats`: the prompts' features where already computed (a frozen router's cached ones)."""
        kind = kind or self.opts.ood
        index = {d: i for i, d in enumerate(self.domains)}
        examples = [(p, d) for p, d in examples if d in index]
        held_out = [(p, d) for p, d in held_out if d in index]
        self.model.eval()
        with torch.no_grad():
            if train_feats is None:
                train_probs, train_feats = self.outputs([p for p, _ in examples])
            else:
                train_probs = torch.softmax(self.model.classifier(train_feats.to(self._device())).float(), -1).cpu()
            detector = OODDetector.fit(kind, train_feats.cpu(), torch.tensor([index[d] for _, d in examples]),
                                       len(self.domains))
            if held_out:
                if held_out_feats is None:
                    probs, feats = self.outputs([p for p, _ in held_out])
                else:
                    feats = held_out_feats.cpu()
                    probs = torch.softmax(self.model.classifier(held_out_feats.to(self._device())).float(), -1).cpu()
                detector.calibrate(detector.scores(feats, probs), self.opts.ood_quantile, "held-out prompts")
            else:
                scores = detector.scores(train_feats.cpu(), train_probs, leave_one_out=True)
                detector.calibrate(scores, self.opts.ood_quantile,
                                   "training prompts" + (" (leave-one-out)" if kind == "knn" else ""))
        self.detector = detector
        return detector

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def outputs(self, prompts: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) routing probabilities and (N, H) router features (the pooled prompt states its classifier reads);
        each distinct prompt is encoded once."""
        self.model.eval()
        device = self._device()

        def features(rows: list[dict[str, list[int]]]) -> torch.Tensor:
            if self.opts.router_tuning == "trunk":
                return self._trunk_features(rows, len(rows)).to(device)  # (b, H)
            if self.opts.router_layer is not None:
                return self._early_features(rows)  # (b, H)
            b = {k: v.to(device) for k, v in self.encoder.pad(rows).items()}  # (b, T)
            return self.backbone(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))  # (b, H)

        return prompt_outputs(prompts, self.encoder, features, self.model.classifier, len(self.domains), batch_size)

    def _early_features(self, rows: Sequence[dict[str, list[int]]]) -> torch.Tensor:
        assert self.opts.router_layer is not None  # only called for a router_layer router
        return early_features(self.backbone, self.encoder, rows, self.opts.router_layer)  # (b, H)

    def _trunk_features(self, rows: Sequence[dict[str, list[int]]], batch_size: int) -> torch.Tensor:
        """(N, H): per encoded prompt, the mean over its tokens of the frozen trunk's output states."""
        if not rows:
            return torch.empty(0, self.backbone.hidden_size)
        states = compute_trunk(self.backbone, list(rows), self.encoder, batch_size)  # (T_i, H) each
        return torch.stack([s.mean(0) for s in states])

    def probs(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) routing probabilities; each distinct prompt is classified once."""
        return self.outputs(prompts, batch_size)[0]

    def ood_check(self, feats: torch.Tensor, probs: torch.Tensor) -> OODCheck | None:
        """The `options.ood` detector's verdicts, None when it is off."""
        if self.opts.ood == "none":
            return None
        if self.detector is None or self.detector.kind != self.opts.ood:
            have = self.detector.kind if self.detector is not None else "none"
            raise UserError(f"options.ood is {self.opts.ood!r} but this router was trained with ood={have!r}: "
                            "retrain the router (moerm train, or add-domain) with that setting")
        return self.detector.check(feats, probs)

    def routes(self, prompts: Sequence[str], hints: Sequence[str | None] | None, batch_size: int = 32) -> list[Route]:
        """Per input, where it goes (`decide_routes` with this router's options and OOD detector)."""
        probs, feats = self.outputs(prompts, batch_size)  # (N, D), (N, H)
        return decide_routes(probs, self.domains, hints, self.opts, self.ood_check(feats, probs))

    def save(self, path: Path) -> None:
        atomic_save_safetensors(self.model.classifier.state_dict(), path / "classifier.safetensors")
        save_backbone(self.backbone, self.tuning, path, self.encoder.tokenizer)
        if self.detector is not None:
            self.detector.save(path)

    @classmethod
    def load(cls, path: Path, config: RunConfig, opts: RouterOptions, domains: list[str]) -> "Router":
        m = config.model
        tuning = backbone_tuning(opts.router_tuning)
        backbone = load_backbone(saved_backbone_path(tuning, path, m.backbone), m.pooling, **backbone_kwargs(config))
        restore_adapters(backbone, tuning, path, trainable=False)
        router = cls(config, opts, domains, backbone=backbone)
        router.model.classifier.load_state_dict(load_file(str(path / "classifier.safetensors")))
        router.detector = OODDetector.load(path)
        return router
