"""Baseline (one RM on all domains, full fine-tuning) and BaseLoRA (the same with LoRA).

Both also support `frozen` tuning: the backbone stays fixed, its pooled features are cached on disk, and only the
head trains (seconds on a CPU instead of hours).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from moerm.config import RunConfig
from moerm.data.schema import PreferencePair
from moerm.encoding import Backbone, backbone_kwargs, load_backbone, load_config, make_encoder
from moerm.encoding.cache import frozen_features
from moerm.encoding.tuning import tuning_mode
from moerm.inference import batched_forward
from moerm.modules.heads import HFScoreHead, RewardHead
from moerm.modules.reward_model import RewardModel
from moerm.systems.base import FitContext, FitResult, RewardSystem, ScoreOutput, register
from moerm.systems.calibration import Calibration, CalibrationOptions, fit_calibration, hold_back, reference_source
from moerm.systems.components import fit_component
from moerm.train import distributed
from moerm.atomic import atomic_save_safetensors
from moerm.train.pairwise import FeaturePairs, TokenPairs


CALIBRATION_FILE = "calibration.json"  # options.calibration=zscore: the RM's map (systems.calibration)
ROUTE = "rm"  # a single RM's one route, in its calibration file


@register
class BaselineSystem(RewardSystem):
    """One reward model trained on every domain together."""

    name = "baseline"
    options_class = CalibrationOptions
    component_defaults = {"reward_model": {}}

    def __init__(self, config: RunConfig, backbone: Backbone | None = None, head: nn.Module | None = None,
                 tokenizer_path: str | None = None):
        super().__init__(config)
        m = self.config.model
        self.backbone = backbone if backbone is not None else load_backbone(m.backbone, m.pooling, **backbone_kwargs(self.config))
        self.head = head if head is not None else self.make_head(self.config, self.backbone.hidden_size)
        if backbone is None:
            self.tuning.apply(self.backbone, m)
        elif not self.tuning.trains_backbone:
            self.backbone.requires_grad_(False)
        self.model = RewardModel(self.backbone, self.head)
        self.encoder = make_encoder(tokenizer_path or m.backbone, m.max_length)
        self.calibration = Calibration()  # options.calibration=zscore: the map fitted by `fit`, saved beside the head

    @classmethod
    def make_head(cls, config: RunConfig, hidden_size: int) -> nn.Module:
        """Pooled features (N, H) -> rewards (N,); subclasses swap in other heads (MoRE: a sparse MoE)."""
        m = config.model
        if m.head == "hf":  # an imported HF reward model's own head; its shape comes from the backbone's HF config
            return HFScoreHead.for_config(load_config(m.backbone))
        return RewardHead(hidden_size, m.head, m.head_hidden, m.head_dropout)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- training
    def _feature_pairs(self, pairs: Sequence[PreferencePair], progress: bool, desc: str) -> FeaturePairs:
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        feats = frozen_features(self.backbone, self.encoder, self.config.model, prompts, responses,
                                self.config.train.eval_batch_size, desc, progress)  # (2N, H)
        n = len(pairs)
        margin = torch.tensor([float(p.margin or 0.0) for p in pairs])
        return FeaturePairs(feats[:n], feats[n:], margin)

    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        t = self.train_config("reward_model")
        kind, share = self.options.calibration, self.options.calibration_share
        train, held = hold_back(train, kind, share, self.config.train.seed)
        if not self.tuning.trains_backbone:  # heads on the frozen backbone's cached features
            data: TokenPairs | FeaturePairs = self._feature_pairs(train, ctx.progress, "features (train)")
            eval_data = self._feature_pairs(eval, ctx.progress, "features (eval)") if eval else None
            module: nn.Module = RewardModel(None, self.head)
            groups = [(self.head, t.head_lr or self.tuning.head_lr or t.lr)]
        else:
            data = TokenPairs.build(train, self.encoder, progress=ctx.progress)
            eval_data = TokenPairs.build(eval, self.encoder) if eval else None
            module = self.model
            groups = [(self.backbone, t.lr), (self.head, t.head_lr or t.lr)]
        fit = fit_component(self.name, module, data, t, ctx, ctx.out_dir, groups, eval_data)
        self.model.to(distributed.device())
        self.calibration = fit_calibration(kind, {ROUTE: [p for ps in held.values() for p in ps]} if held else {},
                                           lambda _, ps, rs: self._raw(ps, rs), reference_source(held, train, share))
        result = FitResult({**fit.metrics, "train_steps": float(fit.steps), "train_seconds": fit.seconds})
        result.add(dataclasses.replace(fit, name="reward_model"))
        return result

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32, mode: str | None = None) -> ScoreOutput:
        self.check_mode(mode)
        raw = self._raw(prompts, responses, batch_size)
        rewards = self.calibration(ROUTE, raw)
        if self.calibration.kind == "none":
            return ScoreOutput(rewards.tolist(), [{"system": self.name} for _ in range(len(rewards))])
        return ScoreOutput(rewards.tolist(), [{"system": self.name, "raw_reward": r, "calibration": "zscore"}
                                              for r in raw.tolist()])

    def _raw(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        self.model.eval()
        return batched_forward(lambda b: self.model(**b), self.encoder, prompts, responses, batch_size, self.device)

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def component_files(self) -> dict[str, list[str]]:
        files = {"head": ["head.safetensors", *([CALIBRATION_FILE] if self.calibration.kind != "none" else [])]}
        if self.tuning.saved_files():
            files["backbone"] = self.tuning.saved_files()
        return files

    def save_components(self, path: Path) -> None:
        atomic_save_safetensors(self.head.state_dict(), path / "head.safetensors")
        self.calibration.save(path / CALIBRATION_FILE)
        # The reward head lives outside the (PEFT) backbone and is saved beside it.
        self.tuning.save(self.backbone, path, self.encoder.tokenizer)

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "BaselineSystem":
        m = config.model
        mode = tuning_mode(m.tuning, cls.top_style)
        backbone = load_backbone(mode.backbone_path(path, m.backbone), m.pooling, **backbone_kwargs(config))
        mode.restore(backbone, path, m)
        head = cls.make_head(config, backbone.hidden_size)
        head.load_state_dict(load_file(str(path / "head.safetensors")))
        system = cls(config, backbone=backbone, head=head,
                     tokenizer_path=mode.backbone_path(path, m.backbone) if mode.saves_backbone else None)
        system.calibration = Calibration.load(path / CALIBRATION_FILE)
        if device is not None:
            system.model.to(device)
        system.model.eval()
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["max_length"] = self.config.model.max_length
        info["calibration"] = self.calibration.to_dict()
        return info


@register
class BaseLoRASystem(BaselineSystem):
    """The baseline with LoRA adapters on the backbone; the head is trained and saved with the adapter."""

    name = "baselora"
    tunings = ("lora", "top")
    default_tuning = "lora"
    top_style = "lora"
