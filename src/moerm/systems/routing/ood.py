"""Out-of-distribution prompts: a detector on the router's prompt features, calibrated so that a chosen share of
in-domain prompts is flagged; its files live in the router folder, versioned with it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moerm.atomic import atomic_save_safetensors, atomic_write_text

OOD_KINDS = ("none", "entropy", "knn", "mahalanobis")
OOD_FILES = {"json": "ood.json", "tensors": "ood.safetensors"}  # inside the router folder: versioned with it


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
        atomic_write_text(path / OOD_FILES["json"], json.dumps(meta, indent=2))

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
