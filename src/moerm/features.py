"""Pooled backbone features, computed once and cached on disk for `frozen` tuning (heads-only training).

Keyed by backbone identity, max_length, pooling and the exact (prompt, response) text, stored as safetensors
shards whose metadata holds the keys, so a killed extraction resumes from the last written shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moerm.backbone import Backbone, PairEncoder

SHARD_ROWS = 1024
SINGLE = "\x00single"  # key marker: the prompt encoded alone, not as a pair with an empty response


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOERM_CACHE", Path.home() / ".cache" / "moerm")) / "features"


def text_key(prompt: str, response: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{response}".encode()).hexdigest()[:32]


class FeatureCache:
    """Disk cache of (H,) feature rows for one (backbone, max_length, pooling)."""

    def __init__(self, root: Path | str | None, backbone_id: str, max_length: int, pooling: str):
        ident = f"{backbone_id}|{max_length}|{pooling}"
        self.dir = Path(root or default_cache_dir()) / hashlib.sha256(ident.encode()).hexdigest()[:20]
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "cache.json"
        if not meta.exists():
            meta.write_text(json.dumps({"backbone": backbone_id, "max_length": max_length, "pooling": pooling}))
        self.index: dict[str, tuple[Path, int]] = {}
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            for row, key in enumerate(keys):
                self.index[key] = (shard, row)

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Rows for the keys that are cached."""
        by_shard: dict[Path, list[tuple[str, int]]] = {}
        for k in keys:
            if k in self.index:
                shard, row = self.index[k]
                by_shard.setdefault(shard, []).append((k, row))
        out: dict[str, torch.Tensor] = {}
        for shard, items in by_shard.items():
            feats = load_file(str(shard))["features"]  # (rows, H)
            for k, row in items:
                out[k] = feats[row]
        return out

    def put(self, keys: list[str], feats: torch.Tensor) -> None:
        """Append one shard atomically (temp file, then rename)."""
        n = len(list(self.dir.glob("shard-*.safetensors")))
        path = self.dir / f"shard-{n:06d}-{os.getpid()}.safetensors"
        tmp = path.with_name("." + path.name + ".tmp")
        save_file({"features": feats.detach().float().contiguous().cpu()}, str(tmp), metadata={"keys": json.dumps(keys)})
        os.replace(tmp, path)
        for row, k in enumerate(keys):
            self.index[k] = (path, row)


@torch.no_grad()
def encode_features(
    backbone: Backbone,
    encoder: PairEncoder,
    prompts: Sequence[str],
    responses: Sequence[str] | None,
    batch_size: int = 64,
    cache: FeatureCache | None = None,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Pooled features (N, H) for each (prompt, response), computing only what the cache lacks.

    With `responses=None` each prompt is encoded alone (`encode_single`, as a router reads it).
    Work is sorted by length so batches carry little padding; results come back in input order.
    """
    single = responses is None
    keys = [text_key(p, SINGLE) for p in prompts] if single else [text_key(p, r) for p, r in zip(prompts, responses)]
    found = cache.get(keys) if cache is not None else {}
    todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.items(), key=lambda kv: kv[1])
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    computed: dict[str, torch.Tensor] = {}
    if todo:
        encoded = [(k, encoder.encode_single(prompts[i]) if single else encoder.encode(prompts[i], responses[i]))  # type: ignore[index]
                   for k, i in todo]
        encoded.sort(key=lambda ke: len(ke[1]["input_ids"]))
        pending_keys: list[str] = []
        pending: list[torch.Tensor] = []
        bar = tqdm(total=len(encoded), desc=desc, disable=not progress or None, leave=False, dynamic_ncols=True)
        for s in range(0, len(encoded), batch_size):
            chunk = encoded[s : s + batch_size]
            batch = {k: v.to(device) for k, v in encoder.pad([e for _, e in chunk]).items()}
            feats = backbone(**batch).float().cpu()  # (b, H)
            for (k, _), f in zip(chunk, feats):
                computed[k] = f
                pending_keys.append(k)
                pending.append(f)
            if cache is not None and len(pending_keys) >= SHARD_ROWS:
                cache.put(pending_keys, torch.stack(pending))
                pending_keys, pending = [], []
            bar.update(len(chunk))
        bar.close()
        if cache is not None and pending_keys:
            cache.put(pending_keys, torch.stack(pending))
    backbone.train(was_training)
    rows = [found[k] if k in found else computed[k] for k in keys]
    return torch.stack(rows) if rows else torch.zeros(0, backbone.hidden_size)
