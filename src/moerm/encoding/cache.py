"""Everything cached about a backbone, under one keying scheme.

`backbone_id` is the identity every cache key starts from: the folder name plus a content hash of its config,
tokenizer and weights (and the dtype when it is not float32). `FeatureCache` holds pooled features for `frozen`
tuning (heads-only training), keyed by (backbone_id, max_length, pooling) for its folder and by the exact
(prompt, response) text for its rows, stored as safetensors shards whose metadata holds the keys, so a killed
extraction resumes from the last written shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from moerm.atomic import atomic_save_safetensors
from moerm.encoding.backbone import Backbone, resolve_model_path
from moerm.encoding.pairs import PairEncoder

if TYPE_CHECKING:
    from moerm.config import ModelConfig

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
        atomic_save_safetensors({"features": feats.detach().float()}, path, metadata={"keys": json.dumps(keys)})
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


ENCODING_VERSION = 2  # bump when PairEncoder's output changes for the same text, so cached features are redone
FULL_HASH_MAX_BYTES = 2 * 1024**3  # weight files up to this size are hashed in full
SAMPLE_CHUNKS = 16  # bigger files: this many 1 MiB chunks spread over the file, plus the safetensors header
CHUNK_BYTES = 1 << 20
_TEXT_FILES = ("*.json", "*.txt", "*.model", "*.jinja")  # config, tokenizer and chat-template files: hashed in full
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime_ns, ctime_ns, inode) -> digest


def weights_digest(path: Path) -> str:
    """A content hash of one safetensors file, memoised in-process by (path, size, mtime_ns, ctime_ns, inode).

    Files up to FULL_HASH_MAX_BYTES are hashed byte for byte, so a copied folder keeps its id. Bigger files are
    sampled (their size, mtime_ns, header and SAMPLE_CHUNKS chunks): any rewrite changes the mtime, so a stale
    cache is never reused, at the price of a miss when the same weights are copied elsewhere.
    """
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key in _DIGESTS:
        return _DIGESTS[key]
    with open(path, "rb") as fh:
        if st.st_size <= FULL_HASH_MAX_BYTES:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        else:
            h = hashlib.sha256(f"sampled:{st.st_size}:{st.st_mtime_ns}".encode())
            head = fh.read(8)  # little-endian u64: the JSON header's length
            h.update(head)
            h.update(fh.read(min(int.from_bytes(head, "little"), 64 * CHUNK_BYTES)))
            for i in range(SAMPLE_CHUNKS):
                fh.seek((st.st_size - CHUNK_BYTES) * i // (SAMPLE_CHUNKS - 1))
                h.update(fh.read(CHUNK_BYTES))
            digest = h.hexdigest()
    _DIGESTS[key] = digest
    return digest


def backbone_id(name_or_path: str, dtype: str | None = None) -> str:
    """A stable identity for feature caches: the folder name plus a hash of its config, tokenizer and weights' bytes.

    Hub names (no local folder) are returned as they are. A `dtype` other than float32 (`auto` is float32) is part
    of the id, since bf16/fp16 weights give other features.
    """
    path = Path(resolve_model_path(name_or_path))
    suffix = f"|{dtype}" if dtype not in (None, "auto", "float32") else ""
    if path.is_dir():
        h = hashlib.sha256(f"encoding-v{ENCODING_VERSION}".encode())
        texts = sorted({f for pattern in _TEXT_FILES for f in path.glob(pattern)})
        for f in texts:
            h.update(f"{f.name}:".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{weights_digest(f)}".encode())
        return f"{path.name}@{h.hexdigest()[:16]}{suffix}"
    return name_or_path + suffix




def frozen_features(backbone: Backbone, encoder: PairEncoder, model: "ModelConfig", prompts: Sequence[str],
                    responses: Sequence[str] | None, batch_size: int = 64, desc: str = "features",
                    progress: bool = True) -> torch.Tensor:
    """Pooled features (N, H) of a frozen backbone through the run's cache: keyed by backbone identity (content and
    dtype), max_length (the encoder's) and pooling; computed on the training device, by the main process first so
    the other processes of a multi-process run read them from the cache."""
    from moerm.train import distributed

    cache = FeatureCache(model.feature_cache, backbone_id(model.backbone, model.dtype), encoder.max_length,
                         backbone.pooling)
    backbone.to(distributed.device())
    with distributed.main_first():
        return encode_features(backbone, encoder, prompts, responses, batch_size, cache, desc=desc, progress=progress)
