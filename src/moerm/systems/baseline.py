"""Baseline (one RM on all domains, full fine-tuning) and BaseLoRA (the same with LoRA).

Both also support `frozen` tuning: the backbone stays fixed, its pooled features are cached on disk, and only the
head trains (seconds on a CPU instead of hours).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from moerm.backbone import Backbone, backbone_id, backbone_kwargs, load_backbone, make_encoder
from moerm.config import ConfigError, RunConfig
from moerm.data.schema import PreferencePair
from moerm.features import FeatureCache, encode_features
from moerm.inference import batched_forward
from moerm.modules.heads import RewardHead
from moerm.modules.reward_model import RewardModel
from moerm.systems.base import FitContext, FitResult, RewardSystem, ScoreOutput, register
from moerm.train import distributed
from moerm.train.checkpoint import atomic_save_safetensors
from moerm.train.pairwise import FeaturePairs, TokenPairs, make_pairwise_step, pairwise_eval
from moerm.train.trainer import Trainer

FROZEN_HEAD_LR = 1e-3


def lora_config(cfg: RunConfig) -> LoraConfig:
    m = cfg.model
    return LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=m.lora_target_modules)


@register
class BaselineSystem(RewardSystem):
    """One reward model trained on every domain together."""

    name = "baseline"
    default_tuning = "full"

    def __init__(self, config: RunConfig, backbone: Backbone | None = None, head: nn.Module | None = None,
                 tokenizer_path: str | None = None):
        if config.model.tuning == "auto":
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, tuning=self.default_tuning))
        self._check_tuning(config.model.tuning)
        super().__init__(config)
        m = config.model
        self.backbone = backbone if backbone is not None else load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
        self.head = head if head is not None else self.make_head(config, self.backbone.hidden_size)
        if backbone is None and m.tuning == "lora":
            self.backbone.model = get_peft_model(self.backbone.model, lora_config(config))
        if m.tuning == "frozen":
            self.backbone.requires_grad_(False)
        self.model = RewardModel(self.backbone, self.head)
        self.encoder = make_encoder(tokenizer_path or m.backbone, m.max_length)

    @classmethod
    def _check_tuning(cls, tuning: str) -> None:
        pass

    @classmethod
    def make_head(cls, config: RunConfig, hidden_size: int) -> nn.Module:
        """Pooled features (N, H) -> rewards (N,); subclasses swap in other heads (MoRE: a sparse MoE)."""
        m = config.model
        return RewardHead(hidden_size, m.head, m.head_hidden, m.head_dropout)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- training
    def _feature_pairs(self, pairs: Sequence[PreferencePair], cache: FeatureCache, progress: bool, desc: str) -> FeaturePairs:
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        self.backbone.to(distributed.device())  # extract on the training device (a GPU when there is one)
        with distributed.main_first():  # the main process fills the cache; the others then read it
            feats = encode_features(self.backbone, self.encoder, prompts, responses,
                                    self.config.train.eval_batch_size, cache, desc=desc, progress=progress)  # (2N, H)
        n = len(pairs)
        margin = torch.tensor([float(p.margin or 0.0) for p in pairs])
        return FeaturePairs(feats[:n], feats[n:], margin)

    def fit(self, train: Sequence[PreferencePair], eval: Sequence[PreferencePair] | None, ctx: FitContext) -> FitResult:
        cfg, t = self.config, self.config.train
        if cfg.model.tuning == "frozen":
            cache = FeatureCache(cfg.model.feature_cache, backbone_id(cfg.model.backbone, cfg.model.dtype), cfg.model.max_length,
                                 self.backbone.pooling)
            data: TokenPairs | FeaturePairs = self._feature_pairs(train, cache, ctx.progress, "features (train)")
            eval_data = self._feature_pairs(eval, cache, ctx.progress, "features (eval)") if eval else None
            module: nn.Module = RewardModel(None, self.head)
            groups = [(self.head, t.head_lr or FROZEN_HEAD_LR)]
        else:
            data = TokenPairs.build(train, self.encoder, progress=ctx.progress)
            eval_data = TokenPairs.build(eval, self.encoder) if eval else None
            module = self.model
            groups = [(self.backbone, t.lr), (self.head, t.head_lr or t.lr)]
        trainer = Trainer(
            module, make_pairwise_step(t.center_rewards_coefficient, t.use_margin), data, data.collate, t,
            ctx.out_dir, groups,
            eval_fn=(lambda m: pairwise_eval(m, eval_data, t.eval_batch_size)) if eval_data is not None else None,
            desc=self.name, progress=ctx.progress, stop_after_steps=ctx.stop_after_steps,
        )
        result = trainer.train(resume=ctx.resume)
        self.model.to(trainer.accelerator.device)
        metrics = {**result.final_metrics, "train_steps": float(result.steps), "train_seconds": result.seconds}
        return FitResult(metrics, {"reward_model": result.seconds})

    # -- inference
    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.model.eval()
        rewards = batched_forward(lambda b: self.model(**b), self.encoder, prompts, responses, batch_size, self.device)
        return ScoreOutput(rewards.tolist(), [{"system": self.name} for _ in range(len(rewards))])

    # -- persistence
    def components(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def component_files(self) -> dict[str, list[str]]:
        tuning = self.config.model.tuning
        files = {"head": ["head.safetensors"]}
        if tuning == "full":
            files["backbone"] = ["backbone"]
        elif tuning == "lora":
            files["backbone"] = ["adapter"]
        return files

    def save_components(self, path: Path) -> None:
        tuning = self.config.model.tuning
        atomic_save_safetensors(self.head.state_dict(), path / "head.safetensors")
        if tuning == "full":
            self.backbone.model.save_pretrained(path / "backbone", safe_serialization=True)
            self.encoder.tokenizer.save_pretrained(path / "backbone")
        elif tuning == "lora":
            # The reward head lives outside the PEFT model and is saved beside the adapter (head.safetensors).
            self.backbone.model.save_pretrained(path / "adapter", safe_serialization=True)

    @classmethod
    def load_components(cls, path: Path, config: RunConfig, device: str | torch.device | None = None) -> "BaselineSystem":
        m = config.model
        if m.tuning == "full":
            backbone = load_backbone(str(path / "backbone"), m.pooling, **backbone_kwargs(config))
        else:
            backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
            if m.tuning == "lora":
                backbone.model = PeftModel.from_pretrained(backbone.model, str(path / "adapter"), is_trainable=True)
        head = cls.make_head(config, backbone.hidden_size)
        head.load_state_dict(load_file(str(path / "head.safetensors")))
        system = cls(config, backbone=backbone, head=head,
                     tokenizer_path=str(path / "backbone") if m.tuning == "full" else None)
        if device is not None:
            system.model.to(device)
        system.model.eval()
        return system

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        info = super().describe(path)
        info["max_length"] = self.config.model.max_length
        return info


@register
class BaseLoRASystem(BaselineSystem):
    """The baseline with LoRA adapters on the backbone; the head is trained and saved with the adapter."""

    name = "baselora"
    default_tuning = "lora"

    @classmethod
    def _check_tuning(cls, tuning: str) -> None:
        if tuning != "lora":
            raise ConfigError(f"system 'baselora' trains LoRA adapters: model.tuning must be lora or auto, got {tuning!r}")
