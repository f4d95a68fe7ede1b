"""`Router`: a domain classifier over prompts on one `RouterBackend` (`backends.py`), with its optional
out-of-distribution detector. RODOS and DMoERM build one on a backbone of its own (`Router(config, opts, domains)`:
cached frozen features, early layers, trunk states or a tuned backbone, from `options.router_tuning` and
`options.router_layer`); ARLISS builds one on its shared base (`Router.on`). Training, routing decisions and saving
are the same for all of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from moerm.config import RunConfig, TrainConfig
from moerm.encoding import Backbone, PairEncoder, backbone_kwargs, load_backbone, make_encoder
from moerm.encoding.tuning import TuningMode, set_trunk, tuning_mode
from moerm.errors import UserError
from moerm.eval.intervals import Interval, clustered_accuracy_ci
from moerm.modules.router import DomainClassifier
from moerm.systems.components import ComponentFit, fit_component
from moerm.systems.routing.backends import CachedPooled, EarlyLayers, RouterBackend, TrunkStates, TunedBackbone
from moerm.systems.routing.decisions import Route, decide_routes
from moerm.systems.routing.features import prompt_outputs
from moerm.systems.routing.ood import OODCheck, OODDetector
from moerm.systems.routing.options import RouterOptions
from moerm.systems.routing.store import RouterPaths
from moerm.train import distributed
from moerm.atomic import atomic_save_safetensors
from moerm.train.classification import FeatureTexts, PromptTexts


def backbone_tuning(router_tuning: str) -> TuningMode:
    """How a router's own backbone trains and is saved: a trunk router's is frozen (only its classifier trains)."""
    return tuning_mode("frozen" if router_tuning == "trunk" else router_tuning)


def own_backend(backbone: Backbone, encoder: PairEncoder, config: RunConfig, opts: RouterOptions) -> RouterBackend:
    """The backend `options.router_tuning` / `options.router_layer` ask for, on a backbone of the router's own."""
    if opts.router_tuning == "trunk":
        return TrunkStates(backbone, encoder)
    if opts.router_tuning != "frozen":
        return TunedBackbone(backbone, encoder)
    if opts.router_layer is not None:  # after a few blocks: cheap enough not to cache
        return EarlyLayers(backbone, encoder, opts.router_layer)
    return CachedPooled(backbone, encoder, config.model)


class Router:
    """A DomainClassifier over prompts on one backend; `routes` turns its probabilities into `Route`s."""

    def __init__(self, config: RunConfig, opts: RouterOptions, domains: Sequence[str], backbone: Backbone | None = None):
        """A router on a backbone of its own (RODOS, DMoERM): loaded from `config.model` unless given."""
        m = config.model
        mode = backbone_tuning(opts.router_tuning)
        if opts.router_layer is not None and opts.router_tuning != "frozen":
            raise UserError(f"options.router_layer is a frozen router's option; options.router_tuning is "
                            f"{opts.router_tuning!r}")
        if backbone is None:
            backbone = load_backbone(m.backbone, m.pooling, **backbone_kwargs(config))
            mode.apply(backbone, m)  # lora: only the adapter and the classifier train
        elif not mode.trains_backbone:
            backbone.requires_grad_(False)
        if opts.router_tuning == "trunk":
            set_trunk(backbone, m)  # its features: the trunk's output, model.trainable_layers below the top
        encoder = make_encoder(m.backbone, opts.router_max_length)
        self._setup(config, opts, domains, own_backend(backbone, encoder, config, opts), mode)

    @classmethod
    def on(cls, backend: RouterBackend, classifier: nn.Module, config: RunConfig, opts: RouterOptions,
           domains: Sequence[str]) -> "Router":
        """A router on a given backend whose classifier is `classifier` (shared, not copied: ARLISS's router head)."""
        router = cls.__new__(cls)
        router._setup(config, opts, domains, backend, None, classifier)
        return router

    def _setup(self, config: RunConfig, opts: RouterOptions, domains: Sequence[str], backend: RouterBackend,
               mode: TuningMode | None, classifier: nn.Module | None = None) -> None:
        self.config, self.opts, self.domains = config, opts, list(domains)
        self.backend = backend
        self.mode = mode  # how its own backbone trains and is saved; None: a shared base, saved by its system
        self.backbone, self.encoder = backend.backbone, backend.encoder
        self.model = DomainClassifier(self.backbone, self.backbone.hidden_size, len(self.domains), classifier=classifier)
        self.eval_accuracy: float | None = None  # on held-out prompts, set by `fit` when it had some
        self.detector: OODDetector | None = None  # options.ood: fitted by `fit`, saved in the router folder

    def _features(self, examples: Sequence[tuple[str, str]], ctx: Any, desc: str) -> FeatureTexts:
        feats = self.backend.train_features([p for p, _ in examples], self.config.train.eval_batch_size, desc,
                                            ctx.progress)  # (N, H)
        return FeatureTexts.labelled(feats, examples, self.domains)

    def fit(self, examples: Sequence[tuple[str, str]], out_dir: Path, ctx: Any, train_cfg: TrainConfig,
            eval_examples: Sequence[tuple[str, str]] = (),
            calibration_examples: Sequence[tuple[str, str]] = ()) -> ComponentFit:
        """Train on `examples`; `eval_examples` (held-out prompts, unknown domains dropped) give its eval accuracy
        and nothing else; the OOD threshold is set on `calibration_examples` (prompts held back from training, never
        the evaluation's), or on the training prompts without any."""
        held_out = [(p, d) for p, d in eval_examples if d in self.domains]
        head_lr = train_cfg.head_lr or train_cfg.lr
        trained = self.backend.trained
        if trained is None:  # a classifier on precomputed features
            data: PromptTexts | FeatureTexts = self._features(examples, ctx, "features (router)")
            eval_data = self._features(held_out, ctx, "features (router eval)") if held_out else None
            if self.mode is None:
                module: nn.Module = DomainClassifier(None, self.backbone.hidden_size, len(self.domains),
                                                     classifier=self.model.classifier)
            else:  # (built, then given the classifier: the RNG draws of earlier releases, so runs repeat)
                module = DomainClassifier(None, self.backbone.hidden_size, len(self.domains))
                module.classifier = self.model.classifier
            groups = [(self.model.classifier, head_lr)]
        else:
            data = PromptTexts.build(examples, self.domains, self.encoder)
            eval_data = PromptTexts.build(held_out, self.domains, self.encoder) if held_out else None
            module = self.model
            groups = [(trained, train_cfg.lr), (self.model.classifier, head_lr)]
        fit = fit_component("router", module, data, train_cfg, ctx, out_dir, groups, eval_data, kind="classification")
        self.model.to(distributed.device())
        self.eval_accuracy = fit.metrics.get("eval_accuracy")
        if self.opts.ood != "none":
            cached = isinstance(data, FeatureTexts)
            calib = [(p, d) for p, d in calibration_examples if d in self.domains]
            calib_feats = self._features(calib, ctx, "features (router calibration)").features if cached and calib \
                else None
            self.fit_detector(examples, calib, data.features if cached else None, calib_feats)
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
        return prompt_outputs(prompts, self.encoder, self.backend.features, self.model.classifier, len(self.domains),
                              batch_size)

    def probs(self, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) routing probabilities; each distinct prompt is classified once."""
        return self.outputs(prompts, batch_size)[0]

    def accuracy(self, prompts: Sequence[str], domains: Sequence[str], batch_size: int = 32) -> Interval:
        """Top-1 accuracy over the distinct prompts (each one routing decision, labelled with its first domain), with
        its 95% bootstrap interval."""
        first = dict(zip(prompts, domains))
        unique = list(first)
        top = self.probs(unique, batch_size).argmax(-1)  # (P,)
        right = [float(self.domains[int(j)] == first[q]) for j, q in zip(top, unique)]
        return clustered_accuracy_ci(right, unique)

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

    def save(self, paths: RouterPaths) -> None:
        """The classifier at `paths.head`; a backbone of its own (what its tuning changed) and the OOD detector in
        `paths.dir`. A shared backend's adapter is the system's to save."""
        atomic_save_safetensors(self.model.classifier.state_dict(), paths.head)
        if self.mode is not None:
            self.mode.save(self.backbone, paths.dir, self.encoder.tokenizer)
        if self.detector is not None:
            self.detector.save(paths.dir)

    def load_head(self, paths: RouterPaths) -> None:
        self.model.classifier.load_state_dict(load_file(str(paths.head)))
        self.detector = OODDetector.load(paths.dir)

    @classmethod
    def load(cls, paths: RouterPaths, config: RunConfig, opts: RouterOptions, domains: list[str]) -> "Router":
        """A router with a backbone of its own, saved by `save`."""
        m = config.model
        mode = backbone_tuning(opts.router_tuning)
        backbone = load_backbone(mode.backbone_path(paths.dir, m.backbone), m.pooling, **backbone_kwargs(config))
        mode.restore(backbone, paths.dir, m, trainable=False)
        router = cls(config, opts, domains, backbone=backbone)
        router.load_head(paths)
        return router
