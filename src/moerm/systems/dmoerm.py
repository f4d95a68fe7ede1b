"""DMoERM (Quan 2024): a double-layer mixture of experts reward model.

Outer layer (sparse): a task router (top-1 over the prompt) picks one task's inner model; it is trained first and then
frozen. Inner layer (dense), one per task, trained in three phases:

1. a base RM fine-tuned on the task's overall preference pairs of split A (default 60% of the task's pairs);
2. one LoRA expert per capability dimension on the frozen phase-1 model, each with a copy of the phase-1 head,
   trained on that capability's pairwise labels (aspect scores in the data, or LLM-judge labels) from split A;
3. everything frozen; an aggregator MLP (Linear(K*H -> H), PReLU, Linear(H -> 1)) over the concatenated pooled
   states of the K experts, trained on the overall preference pairs of split B (the other 40%).

Unlike the public reference code, the ranking direction is the same everywhere (Bradley-Terry on chosen - rejected;
accuracy counts chosen > rejected), split A trains phases 1-2 and split B phase 3, the router's cross-entropy reads
logits, and every phase starts from pretrained weights.

Inference runs the K experts of a task together (`ExpertBank`: the lower blocks once, the adapted top per expert);
`score` returns the reward, each expert's own sub-score (its head on its state), and the routed task.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from moerm.encoding import Backbone, backbone_kwargs, load_backbone, make_encoder
from moerm.config import ConfigError, RunConfig, from_dict, resolve_path
from moerm.data.grouping import split_by_prompt
from moerm.data.readers import load_pairs
from moerm.data.schema import PreferencePair
from moerm.inference import sorted_batches
from moerm.labeling.aspects import capability_pairs
from moerm.modules.aggregator import CapabilityAggregator
from moerm.encoding.blocks import expert_layer_indices, transformer_blocks
from moerm.encoding.experts import ExpertBank
from moerm.modules.reward_model import RewardModel
from moerm.encoding.adapters import lora_parameters
from moerm.errors import UserError
from moerm.encoding.tuning import (
    ParamView, add_adapter, base_parameters, load_adapter, lora_config, set_trainable_adapter,
)
from moerm.systems.base import BenchPlan, FitContext, FitResult, RewardSystem, ScoreOutput, register
from moerm.systems.baseline import BaselineSystem
from moerm.systems.components import ComponentFit, fit_component
from moerm.systems.routing import (
    ROUTER_DEFAULTS, OODOptions, Router, RouterPaths, RouterStore, combine_rewards, load_router_examples,
    router_examples,
)
from moerm.systems.calibration import Calibration, fit_calibration, hold_back, reference_source
from moerm.systems.tasks import TaskSpec, load_tasks_file, parse_tasks, task_of_domain, tasks_to_dict
from moerm.train import distributed
from moerm.atomic import atomic_save_safetensors
from moerm.train.pairwise import FeaturePairs, TokenPairs

DMOERM_FILE = "dmoerm.json"
INFERENCE_MODES = ("batched", "sequential")


@dataclass
class DMoERMOptions(OODOptions):
    """Tasks and the three training phases (set with --set options.KEY=VALUE)."""

    legacy = {"fallback": "mixture"}  # earlier releases took the key and refused any other value

    tasks: dict[str, Any] | None = None  # inline {task: {domains, capabilities}}; see systems/tasks.py
    tasks_file: str | None = None  # or a YAML file of the same shape (copied inline into the saved config)
    split_a: float = 0.6  # share of each task's pairs for phases 1-2; the rest (split B) trains the aggregator
    use_aspects: bool = True  # capability labels from aspect scores in the data
    capability_labels: list[str] = field(default_factory=list)  # files from `moerm label judge/aspects`
    min_capability_pairs: int = 16  # fewer labelled pairs for a capability in split A is an error
    expert_layers: int | None = None  # top blocks carrying expert LoRA; None: a third of them (at least 1)
    aggregator_init: str = "random"  # random: from scratch (the paper); experts: start as the mean of their sub-scores
    inference: str = "batched"  # batched: one pass for all experts; sequential: one set_adapter pass per expert

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.split_a < 1.0:
            raise UserError("options.split_a must be strictly between 0 and 1")
        if self.inference not in INFERENCE_MODES:
            raise UserError(f"options.inference must be batched or sequential; got {self.inference!r}")
        if self.aggregator_init not in ("experts", "random"):
            raise UserError(f"options.aggregator_init must be experts or random; got {self.aggregator_init!r}")

    def resolve_tasks(self) -> list[TaskSpec]:
        if self.tasks and self.tasks_file:
            raise ConfigError("give options.tasks or options.tasks_file, not both")
        if self.tasks:
            return parse_tasks(self.tasks)
        if self.tasks_file:
            return load_tasks_file(self.tasks_file)
        raise ConfigError("dmoerm needs tasks: options.tasks_file=configs/tasks/<file>.yaml or options.tasks inline")


def adapter_of(capability: str) -> str:
    return f"cap_{capability}"  # never peft's reserved "default", never a prefix of "lora_"


def split_ab(pairs: Sequence[PreferencePair], share_a: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Per domain, about `share_a` of the pairs to split A, the rest to split B, whole prompts on one side only (the
    aggregator learns on prompts the experts never saw); both keep file order."""
    return split_by_prompt(pairs, share_a, seed)


class TaskModel(nn.Module):
    """One task's inner dense MoE: K experts on the phase-1 base, their heads, and the aggregator."""

    def __init__(self, bank: ExpertBank, base_head: nn.Module, expert_heads: dict[str, nn.Module],
                 aggregator: CapabilityAggregator):
        super().__init__()
        self.bank = bank
        self.base_head = base_head  # the phase-1 head; each expert head started as a copy of it
        self.expert_heads = nn.ModuleDict(expert_heads)  # capability -> RewardHead: (N, H) -> (N,)
        self.aggregator = aggregator  # (N, K, H) -> (N,)

    @property
    def capabilities(self) -> list[str]:
        return list(self.expert_heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                mode: str = "batched") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards (N,), capability sub-scores (N, K) and the expert states (N, K, H)."""
        states = self.bank.states(input_ids, attention_mask, token_type_ids, mode)  # (N, K, H)
        subs = torch.stack([head(states[:, j]) for j, head in enumerate(self.expert_heads.values())], dim=1)  # (N, K)
        return self.aggregator(states), subs, states


@register
class DMoERMSystem(RewardSystem):
    """Task router -> one inner model per task (base RM, K capability LoRA experts, aggregator MLP)."""

    name = "dmoerm"
    options_class = DMoERMOptions
    # phase 1 fine-tunes each task's base RM fully (top: its top blocks, on a cached trunk); phase 2 adds LoRA
    # experts on it (top: within those top blocks, so the experts read the same cached trunk)
    tunings = ("full", "top")
    inference_modes = INFERENCE_MODES
    routed = True
    # router; phase 1 (base); phase 2 (expert: LoRA at a LoRA rate, capability labels carry no margin);
    # phase 3 (aggregator: a small MLP on cached expert states, many cheap epochs)
    component_defaults = {
        "router": ROUTER_DEFAULTS, "base": {},
        "expert": {"lr": 1e-3, "head_lr": None, "use_margin": False, "max_steps": None},
        "aggregator": {"lr": 1e-3, "head_lr": None, "epochs": 10.0, "batch_size": 32, "grad_accum": 1,
                       "max_steps": None},
    }

    def __init__(self, config: RunConfig):
        super().__init__(config)
        make_encoder(self.config.model.backbone, self.options.router_max_length)  # a too-long router length fails now
        self.opts: DMoERMOptions = self.options
        self.tasks: list[TaskSpec] = []
        self.models: dict[str, TaskModel] = {}
        self.router: Router | None = None
        self.router_examples: list[tuple[str, str]] = []
        self.calibration = Calibration()  # each task model's map onto the common scale (options.calibration)
        self._held_ids: set[str] = set()  # the calibration slice's pair ids, kept from every phase's training
        self.encoder = make_encoder(config.model.backbone, config.model.max_length)
        if self.opts.tasks or self.opts.tasks_file:
            self._set_tasks(self.opts.resolve_tasks())

    @classmethod
    def resolve_options(cls, config: RunConfig) -> RunConfig:
        """The tasks written inline (`options.tasks`, `tasks_file` cleared), so a saved run never needs the file."""
        opts = cls.parse_options(config)
        if not (opts.tasks or opts.tasks_file):
            return config
        options = {**config.options, "tasks": tasks_to_dict(opts.resolve_tasks()), "tasks_file": None}
        return dataclasses.replace(config, options=options)

    @property
    def default_mode(self) -> str:
        return self.opts.inference

    @property
    def domains(self) -> list[str]:
        """The tasks it routes to (a caller's domain names its task)."""
        return self.task_names

    def route_of(self, domain: str) -> str | None:
        return self.task_of_domain.get(domain)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def task_of_domain(self) -> dict[str, str]:
        return task_of_domain(self.tasks)

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.models.values())).parameters()).device if self.models else torch.device("cpu")

    # -- configuration
    def _set_tasks(self, tasks: list[TaskSpec]) -> None:
        """Keep the tasks, and write them inline into the config so the saved run never needs the tasks file."""
        self.tasks = tasks
        options = {**self.config.options, "tasks": tasks_to_dict(tasks), "tasks_file": None}
        self.config = dataclasses.replace(self.config, options=options)
        self.opts.tasks, self.opts.tasks_file = options["tasks"], None

    def _task_pairs(self, pairs: Sequence[PreferencePair]) -> dict[str, list[PreferencePair]]:
        owner = self.task_of_domain
        unknown = sorted({p.domain for p in pairs} - set(owner))
        if unknown:
            raise ConfigError(f"domain(s) {unknown} belong to no task; add them to a task's domains in options.tasks "
                              f"(tasks: {', '.join(self.task_names)})")
        out: dict[str, list[PreferencePair]] = {t: [] for t in self.task_names}
        for p in pairs:
            out[owner[p.domain]].append(p)
        empty = [t for t, ps in out.items() if not ps]
        if empty:
            raise ConfigError(f"task(s) {empty} have no training pairs (their domains: "
                              f"{', '.join(d for t in self.tasks if t.name in empty for d in t.domains)})")
        return out

    def _judge_labels(self) -> list[PreferencePair]:
        if not self.opts.capability_labels:
            return []
        pairs, _ = load_pairs(self.opts.capability_labels, on_invalid="error")
        missing = [p.id for p in pairs if not p.subset]
        if missing:
            raise ConfigError(f"{self.opts.capability_labels}: record {missing[0]!r} has no 'subset' (the capability); "
                              "write capability labels with `moerm label judge` or `moerm label aspects`")
        return pairs

    def capability_data(self, task: TaskSpec, split: Sequence[PreferencePair], judged: Sequence[PreferencePair],
                        exclude_ids: set[str]) -> dict[str, list[PreferencePair]]:
        """Per capability: pairs oriented by aspect scores (ties dropped) plus judge labels, never from split B."""
        out: dict[str, list[PreferencePair]] = {}
        for cap in task.capabilities:
            pairs = capability_pairs(split, cap)[0] if self.opts.use_aspects else []
            pairs += [p for p in judged if p.subset == cap and p.domain in task.domains
                      and p.id.rsplit(":", 1)[0] not in exclude_ids]
            out[cap] = pairs
        return out

    # -- building blocks
    def _add_experts(self, backbone: Backbone, capabilities: Sequence[str]) -> int:
        """Wrap the (frozen) phase-1 model in a PeftModel with one adapter per capability; returns the first layer."""
        m = self.config.model
        top = self.tuning.trunk  # experts within the top blocks, above the cached trunk
        layers = expert_layer_indices(backbone.model, m.trainable_layers if top and self.opts.expert_layers is None
                                      else self.opts.expert_layers)
        if top and len(layers) > m.trainable_layers:
            raise ConfigError(f"options.expert_layers={len(layers)} reaches below the top model.trainable_layers="
                              f"{m.trainable_layers} blocks (the cached trunk); use at most {m.trainable_layers}")
        pattern = transformer_blocks(backbone.model)[0].rsplit(".", 1)[-1]
        for i, cap in enumerate(capabilities):
            torch.manual_seed(self.config.train.seed + i)
            add_adapter(backbone, adapter_of(cap), lora_config(self.config.model, layers, pattern))
        return layers[0]

    @staticmethod
    def _activate(model: TaskModel, capability: str | None) -> None:
        """Only this capability's adapter and head train (None: nothing does, phase 3 trains the aggregator)."""
        if capability is not None:
            model.bank.peft.set_adapter(adapter_of(capability))
        set_trainable_adapter(model.bank.peft, adapter_of(capability) if capability is not None else None)
        model.base_head.requires_grad_(False)
        for cap, head in model.expert_heads.items():
            head.requires_grad_(cap == capability)
        model.aggregator.requires_grad_(capability is None)

    # -- training
    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        if not self.tasks:
            self._set_tasks(self.opts.resolve_tasks())
        o = self.opts
        owner = self.task_of_domain  # a route is a task: its reference, the held-back pairs of its domains
        hold = "zscore" if o.ood != "none" else o.calibration  # the slice also sets the OOD threshold
        train, held = hold_back(train, hold, o.calibration_share, self.config.train.seed)
        kept = {id(p) for p in train}
        self._held_ids = {p.id for ps in held.values() for p in ps if id(p) not in kept}
        reference: dict[str, list[PreferencePair]] = {t: [] for t in self.task_names} if held else {}
        for d, ps in held.items():
            if d in owner:  # a domain of no task is refused by _task_pairs, next
                reference[owner[d]] += ps
        by_task = self._task_pairs(train)
        eval_by_task = self._task_pairs_lenient(eval or [])
        judged = self._judge_labels()
        result = FitResult({})
        # Outer layer first: the task router, then frozen.
        relabelled = [dataclasses.replace(p, domain=self.task_of_domain[p.domain]) for p in train]
        self.router_examples = router_examples(relabelled, self.opts.max_router_prompts_per_domain)
        self.router = Router(self.config, self.opts, self.task_names)
        held_out = router_examples([dataclasses.replace(p, domain=self.task_of_domain[p.domain]) for p in eval or []
                                    if p.domain in self.task_of_domain], self.opts.max_router_prompts_per_domain)
        kept = {id(p) for p in train}
        calibration = router_examples([dataclasses.replace(p, domain=owner[p.domain]) for ps in held.values()
                                       for p in ps if id(p) not in kept and p.domain in owner],
                                      self.opts.max_router_prompts_per_domain)
        result.add(self.router.fit(self.router_examples, ctx.out_dir / "components" / "router", ctx,
                                   self.train_config("router"), held_out, calibration), "router")
        self.router.model.requires_grad_(False)
        for task in self.tasks:
            self._fit_task(task, by_task[task.name], eval_by_task.get(task.name, []), judged, ctx, result)
        self.calibration = fit_calibration(
            o.calibration, reference,
            lambda t, ps, rs: torch.as_tensor(self.score_task(t, ps, rs, self.config.train.eval_batch_size,
                                                              self.default_mode)[0]).float(),
            reference_source(held, train, o.calibration_share))
        return result

    def _task_pairs_lenient(self, pairs: Sequence[PreferencePair]) -> dict[str, list[PreferencePair]]:
        owner = self.task_of_domain
        out: dict[str, list[PreferencePair]] = defaultdict(list)
        for p in pairs:
            if p.domain in owner:
                out[owner[p.domain]].append(p)
        return out

    def _fit_task(self, task: TaskSpec, pairs: list[PreferencePair], eval: list[PreferencePair],
                  judged: Sequence[PreferencePair], ctx: FitContext, result: FitResult) -> None:
        seed = self.config.train.seed
        root = ctx.out_dir / "components" / f"task-{task.name}"
        split_a, split_b = split_ab(pairs, self.opts.split_a, seed)
        if not split_a or not split_b:
            raise ConfigError(f"task {task.name!r}: {len(pairs)} pairs cannot be split {self.opts.split_a:.0%}/"
                              f"{1 - self.opts.split_a:.0%} into non-empty splits A and B")
        # judge labels of split B's pairs and of the held-back calibration slice never train an expert
        cap_train = self.capability_data(task, split_a, judged, {p.id for p in split_b} | self._held_ids)
        short = {c: len(v) for c, v in cap_train.items() if len(v) < self.opts.min_capability_pairs}
        if short:
            raise ConfigError(
                f"task {task.name!r}: too few capability labels in split A for {short} (need at least "
                f"{self.opts.min_capability_pairs}, options.min_capability_pairs). Add aspect scores "
                f"(aspects_chosen/aspects_rejected) or judge labels (moerm label judge; options.capability_labels), "
                f"or drop the capability from the task")
        cap_eval = self.capability_data(task, eval, [], set()) if eval else {}
        result.metrics.update({f"{task.name}:split_a_pairs": float(len(split_a)),
                               f"{task.name}:split_b_pairs": float(len(split_b))})

        # Phase 1: the task's base RM on its overall preference pairs of split A (full fine-tuning).
        base = BaselineSystem(dataclasses.replace(self.config, system="baseline", options={}, components={},
                                                  train=self.train_config("base")))
        result.merge(base.fit(split_a, eval or None, FitContext(root / "phase1", ctx.resume, ctx.progress,
                                                                  ctx.stop_after_steps)), f"{task.name}:phase1")

        # Phase 2: one LoRA expert per capability on the frozen phase-1 model, each head a copy of the phase-1 head.
        backbone = base.backbone
        backbone.requires_grad_(False)
        first = self._add_experts(backbone, task.capabilities)
        heads = {c: copy.deepcopy(base.head) for c in task.capabilities}
        aggregator = CapabilityAggregator(len(task.capabilities), backbone.hidden_size)
        model = TaskModel(ExpertBank(backbone, [adapter_of(c) for c in task.capabilities], first), base.head, heads,
                          aggregator).to(base.device)
        self.models[task.name] = model
        e_cfg = self.train_config("expert")
        for cap in task.capabilities:
            self._activate(model, cap)
            data = TokenPairs.build(cap_train[cap], self.encoder, progress=ctx.progress)
            ev = TokenPairs.build(cap_eval[cap], self.encoder) if cap_eval.get(cap) else None
            name = f"{task.name}:expert:{cap}"
            fit = fit_component(name, RewardModel(backbone, heads[cap]), data, e_cfg, ctx, root / f"expert-{cap}",
                                [(backbone, e_cfg.lr), (heads[cap], e_cfg.head_lr or e_cfg.lr)], ev)
            result.add(fit, name)
            result.metrics[f"{name}:train_pairs"] = float(len(data))
        model.to(distributed.device())
        result.add(self._phase3(task.name, model, split_b, eval, root / "aggregator", ctx), f"{task.name}:aggregator")

    def _phase3(self, task: str, model: TaskModel, split_b: Sequence[PreferencePair], eval: Sequence[PreferencePair],
                out_dir: Path, ctx: FitContext) -> ComponentFit:
        """Everything frozen; the aggregator learns overall preference on split B from the experts' states."""
        self._activate(model, None)
        if self.opts.aggregator_init == "experts":
            self._start_aggregator_from_experts(model)
        t0 = time.perf_counter()
        feats = self._expert_features(model, split_b, ctx.progress, f"{task}: expert states (split B)")
        eval_feats = self._expert_features(model, eval, False, "") if eval else None
        a_cfg = self.train_config("aggregator")
        fit = fit_component(f"{task}:phase3", RewardModel(None, model.aggregator), feats, a_cfg, ctx, out_dir,
                            [(model.aggregator, a_cfg.head_lr or a_cfg.lr)], eval_feats)
        model.to(distributed.device())
        model.eval()
        return dataclasses.replace(fit, seconds=time.perf_counter() - t0)  # feature extraction included

    @staticmethod
    def _start_aggregator_from_experts(model: TaskModel) -> None:
        """Warm start: the aggregator begins as the mean of the experts' (linear) heads on their own states."""
        linears = [head.net[-1] for head in model.expert_heads.values()]
        if not all(isinstance(lin, nn.Linear) and lin.out_features == 1 for lin in linears) or any(
                getattr(head, "kind", "linear") != "linear" for head in model.expert_heads.values()):
            raise ConfigError("options.aggregator_init=experts needs linear reward heads (model.head=linear); "
                              "use options.aggregator_init=random with an MLP head")
        weights = torch.stack([lin.weight[0] for lin in linears]).to(model.aggregator.net[0].weight.device)  # (K, H)
        biases = torch.stack([lin.bias[0] for lin in linears])  # (K,)
        model.aggregator.start_as_mean_of(weights, biases)

    def _padded_batches(self, encoded: list[dict[str, list[int]]], batch_size: int
                        ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Length-sorted batches of `encoded`: (row indices, padded tensors (b, T) on the model's device)."""
        for idx in sorted_batches(encoded, batch_size):
            yield idx, {k: v.to(self.device) for k, v in self.encoder.pad([encoded[i] for i in idx]).items()}

    @torch.no_grad()
    def _expert_features(self, model: TaskModel, pairs: Sequence[PreferencePair], progress: bool, desc: str) -> FeaturePairs:
        """Expert states of chosen (N, K, H) and rejected (N, K, H), in one batched pass per chunk."""
        from tqdm.auto import tqdm

        model.eval()
        encoded = [self.encoder.encode(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
        out: torch.Tensor | None = None
        bs = self.config.train.eval_batch_size
        for idx, batch in tqdm(self._padded_batches(encoded, bs), total=-(-len(encoded) // bs), desc=desc,
                               disable=not progress or None, leave=False):
            states = model.bank.states(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            if out is None:
                out = torch.empty(len(encoded), *states.shape[1:])
            out[torch.tensor(idx)] = states.float().cpu()  # (b, K, H)
        assert out is not None
        margin = torch.tensor([float(p.margin or 0.0) for p in pairs])
        return FeaturePairs(out[0::2], out[1::2], margin)

    # -- inference
    def _route_hints(self, domains: Sequence[str | None] | None) -> list[str | None] | None:
        """A caller's domain names its task; a task name is taken as is; anything else falls back (with a reason)."""
        if domains is None:
            return None
        owner = self.task_of_domain
        return [None if d is None else owner.get(d, d) for d in domains]

    @torch.no_grad()
    def score_task(self, task: str, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32,
                   mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One task's rewards (N,) and capability sub-scores (N, K), all K experts per batch."""
        model = self.models[task]
        model.eval()  # peft mixed-adapter batches refuse training mode; no dropout at inference
        mode = mode or self.opts.inference
        encoded = [self.encoder.encode(p, r) for p, r in zip(prompts, responses)]
        rewards = torch.zeros(len(encoded))
        subs = torch.zeros(len(encoded), len(model.capabilities))
        for idx, batch in self._padded_batches(encoded, batch_size):
            r, s, _ = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), mode=mode)
            rewards[torch.tensor(idx)] = r.float().cpu()
            subs[torch.tensor(idx)] = s.float().cpu()
        return rewards, subs

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        if self.router is None or not self.models:
            raise RuntimeError("DMoERM has no model yet: fit or load it first")
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        mode = self.check_mode(mode)
        routes = self.router.routes(prompts, self._route_hints(domains), batch_size)  # over tasks
        subs: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)

        raw: list[dict[str, float]] = [{} for _ in prompts]

        def per_task(task: str, rows: list[int]) -> torch.Tensor:
            r, s = self.score_task(task, [prompts[i] for i in rows], [responses[i] for i in rows], batch_size, mode)
            caps = self.models[task].capabilities
            for k, i in enumerate(rows):
                subs[task][i] = {c: float(s[k, j]) for j, c in enumerate(caps)}
                raw[i][task] = float(r[k])
            return self.calibration(task, torch.as_tensor(r).float())

        rewards = combine_rewards(routes, per_task, len(prompts))
        details = []
        for i, r in enumerate(routes):  # the routes are tasks: routed_domain / router_top name a task
            det: dict[str, Any] = {"system": self.name, **r.details(), "inference": mode, "raw_rewards": raw[i],
                                   "calibration": self.calibration.kind}
            if r.domain is not None:
                det["capability_scores"] = subs[r.domain][i]
            else:  # the probability-weighted mixture of every task's model
                det["capability_scores_by_task"] = {t: subs[t][i] for t in self.task_names if i in subs[t]}
            details.append(det)
        return ScoreOutput(rewards.tolist(), details)

    # -- moerm bench
    @classmethod
    def bench_plan(cls, options: dict[str, Any], train: Sequence[PreferencePair], test: Sequence[PreferencePair],
                   seeds: Sequence[int], out_dir: Path) -> BenchPlan | None:
        """The tasks of `options.tasks`/`options.tasks_file` restricted to what the data has labels for.

        A task keeps the domains present in the data, and the capabilities with at least `min_capability_pairs`
        aspect-labelled pairs (ties dropped) in split A for every seed; a task with no domain or capability left is
        dropped. DMoERM then trains and is evaluated on the kept tasks' domains only; with none left it is skipped.
        """

        opts = from_dict(DMoERMOptions, dict(options), "options")
        if opts.tasks and opts.tasks_file:
            raise ConfigError("give options.tasks or options.tasks_file, not both")
        if opts.tasks:
            tasks, source = parse_tasks(opts.tasks, "options.tasks"), "options.tasks (inline)"
        elif opts.tasks_file:
            tasks, source = load_tasks_file(resolve_path(opts.tasks_file)), str(opts.tasks_file)
        else:
            raise ConfigError("options.tasks_file: dmoerm needs tasks (a tasks file such as "
                              "configs/tasks/aspect-domains.yaml, or options.tasks inline)")
        if not opts.use_aspects or opts.capability_labels:
            raise ConfigError("options: the bench takes capability labels from aspect scores only "
                              "(use_aspects true, no capability_labels)")
        data_domains = sorted({p.domain for p in train})
        kept: dict[str, Any] = {}
        dropped: list[str] = []
        for t in tasks:
            present = [d for d in t.domains if d in data_domains]
            if not present:
                dropped.append(f"task {t.name}: none of its domains ({', '.join(t.domains)}) is in the data")
                continue
            pairs = [p for p in train if p.domain in present]
            caps = []
            for c in t.capabilities:
                fewest = min(len(capability_pairs(split_ab(pairs, opts.split_a, seed)[0], c)[0]) for seed in seeds)
                if fewest >= opts.min_capability_pairs:
                    caps.append(c)
                else:
                    dropped.append(f"task {t.name}: capability {c} has {fewest} aspect-labelled pairs in split A "
                                   f"(< min_capability_pairs {opts.min_capability_pairs})")
            if not caps:
                dropped.append(f"task {t.name}: no capability with enough aspect labels in {', '.join(present)}")
                continue
            kept[t.name] = {"domains": present, "capabilities": caps}
        info: dict[str, Any] = {"tasks_source": source, "tasks": kept, "dropped": dropped}
        report = [f"Tasks from {source}, restricted to the data's aspect-labelled domains:", ""]
        report += [f"- **{t}**: domains {', '.join(v['domains'])}; capability experts {', '.join(v['capabilities'])}"
                   for t, v in kept.items()]
        if dropped:
            report += ["", "Left out of the plan:", ""] + [f"- {d}" for d in dropped]
        if not kept:
            covered = ", ".join(sorted({d for t in tasks for d in t.domains}))
            return BenchPlan(info=info, report=report, skipped=(
                f"the data has no aspect labels for the domains of {source} (its tasks cover {covered}; the data "
                f"has {', '.join(data_domains)})"))
        keep = {d for v in kept.values() for d in v["domains"]}
        owner = task_of_domain(tasks)
        left_out = {d: (f"task {owner[d]} has no capability with enough aspect labels" if d in owner
                        else f"in none of the tasks of {source}") for d in data_domains if d not in keep}
        d_test = [p for p in test if p.domain in keep]
        if not d_test:
            return BenchPlan(info=info, report=report, left_out=left_out,
                             skipped="no held-out pairs in the domains its tasks cover")
        return BenchPlan(train=[p for p in train if p.domain in keep], test=d_test,
                         options={"tasks": kept, "tasks_file": None}, left_out=left_out, report=report, info=info)

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        comps: dict[str, nn.Module] = {}
        if self.router is not None:
            comps["router"] = self.router.model
        for name, model in self.models.items():
            comps[f"{name}:base"] = ParamView(base_parameters(model.bank.peft) + list(model.base_head.parameters()))
            for cap in model.capabilities:
                comps[f"{name}:expert:{cap}"] = ParamView(lora_parameters(model.bank.peft, adapter_of(cap))
                                                          + list(model.expert_heads[cap].parameters()))
            comps[f"{name}:aggregator"] = model.aggregator
        return comps

    def component_files(self) -> dict[str, list[str]]:
        where = RouterStore(Path(), DMOERM_FILE).relative(0)
        files: dict[str, list[str]] = {"router": [where["dir"], where["prompts"]]}
        for name, model in self.models.items():
            files[f"{name}:base"] = [f"tasks/{name}/backbone"]
            for cap in model.capabilities:
                files[f"{name}:expert:{cap}"] = [f"tasks/{name}/adapters/{adapter_of(cap)}"]
            files[f"{name}:aggregator"] = [f"tasks/{name}/heads.safetensors"]
        return files

    def save_components(self, path: Path) -> None:
        assert self.router is not None
        index: dict[str, Any] = {"tasks": tasks_to_dict(self.tasks), "order": self.task_names, "first_expert_layer": {}}
        for name, model in self.models.items():
            folder = path / "tasks" / name
            peft = model.bank.peft
            # The phase-1 base without the injected LoRA layers (peft wraps targets as `<name>.base_layer`).
            base_state = {k.replace(".base_layer.", "."): v for k, v in peft.get_base_model().state_dict().items()
                          if "lora_" not in k}
            peft.get_base_model().save_pretrained(folder / "backbone", state_dict=base_state, safe_serialization=True)
            self.encoder.tokenizer.save_pretrained(folder / "backbone")
            peft.save_pretrained(str(folder / "adapters"), selected_adapters=list(model.bank.experts),
                                 safe_serialization=True)
            state = {f"base_head.{k}": v for k, v in model.base_head.state_dict().items()}
            for cap, head in model.expert_heads.items():
                state.update({f"expert.{cap}.{k}": v for k, v in head.state_dict().items()})
            state.update({f"aggregator.{k}": v for k, v in model.aggregator.state_dict().items()})
            atomic_save_safetensors({k: v.contiguous() for k, v in state.items()}, folder / "heads.safetensors")
            index["first_expert_layer"][name] = model.bank.first_expert_layer
        # the task models first, then the router (one version: DMoERM has no add-domain) and the index, last
        def save_router(paths: RouterPaths) -> None:
            assert self.router is not None
            self.router.save(paths)
            self.calibration.save(paths.calibration)

        RouterStore(path, DMOERM_FILE).write(0, save_router, self.router_examples, index)

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "DMoERMSystem":
        index = json.loads((path / DMOERM_FILE).read_text())
        system = cls(config)
        tasks = {t.name: t for t in parse_tasks(index["tasks"], str(path / DMOERM_FILE))}
        system.tasks = [tasks[n] for n in index["order"]]
        m = config.model
        for task in system.tasks:
            folder = path / "tasks" / task.name
            backbone = load_backbone(str(folder / "backbone"), m.pooling, **backbone_kwargs(config))
            names = [adapter_of(c) for c in task.capabilities]
            for name in names:  # safetensors only, checked before peft reads the folder
                load_adapter(backbone, folder / "adapters" / name, name, trainable=False)
            backbone.requires_grad_(False)
            state = load_file(str(folder / "heads.safetensors"))
            base_head = BaselineSystem.make_head(config, backbone.hidden_size)
            base_head.load_state_dict({k[len("base_head."):]: v for k, v in state.items() if k.startswith("base_head.")})
            heads = {}
            for cap in task.capabilities:
                heads[cap] = BaselineSystem.make_head(config, backbone.hidden_size)
                prefix = f"expert.{cap}."
                heads[cap].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            aggregator = CapabilityAggregator(len(task.capabilities), backbone.hidden_size)
            aggregator.load_state_dict({k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")})
            bank = ExpertBank(backbone, names, int(index["first_expert_layer"][task.name]))
            model = TaskModel(bank, base_head, heads, aggregator)
            model.requires_grad_(False)
            system.models[task.name] = model.to(device) if device is not None else model
            system.models[task.name].eval()
        paths = RouterStore(path, DMOERM_FILE).paths(0)
        system.router = Router.load(paths, config, system.opts, system.task_names)
        system.router.model.requires_grad_(False)
        if device is not None:
            system.router.model.to(device)
        system.router_examples = load_router_examples(paths.prompts)
        system.calibration = Calibration.load(paths.calibration)
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["tasks"] = tasks_to_dict(self.tasks)
        info["router_tuning"] = self.opts.router_tuning
        info["calibration"] = self.calibration.to_dict()
        info["domains"] = sorted(self.task_of_domain)
        return info
