"""The shared frozen trunk of `top` tuning: the lower blocks run once per text, their token states are cached.

With `model.tuning: top` and `model.trainable_layers: N`, the embeddings and the lower L - N transformer blocks keep
their pretrained weights and stay frozen; only the top N blocks (fully, or with LoRA on them) and the heads train.
The trunk's output for a sequence, the hidden-state input of block L - N, depends only on the backbone's weights and
the sequence's token ids, so it is computed once and cached:

- `TrunkCache`: one folder per (backbone identity, first trained block); a row is keyed by a hash of the token ids
  (and token type ids), so every system, seed, max_length and router that feeds the same tokens to the same trunk
  shares it. Rows are stored in fp16 shards (raw little-endian arrays read back memory-mapped, plus a JSON index
  written after the data, so an interrupted write leaves no index and is recomputed). A shard whose size does not
  match its index, or whose index names another backbone, is ignored (its rows are recomputed), never read.
- `attach_trunk`: before a component trains, every encoding of its datasets gets a reference to its cached states
  (computing what is missing); `PairEncoder.pad` pads them into `trunk_states` (B, T, H) beside the token ids, and
  `Backbone.forward(trunk_states=...)` runs the model with the trunk's blocks replaced by pass-throughs
  (`encoding.blocks.fed_from_trunk`), so only the top blocks run, forward and backward.

At inference nothing is cached by default: the backbone runs whole (the trunk's weights are the pretrained ones), so
rewards do not depend on the cache. Training reads the trunk's states rounded to fp16, the documented price of the
cache. Scoring the same texts many times (the bench scores one held-out set with every system and seed) can opt in:
inside `trunk_cache_at_inference(system)`, each of its `top`-tuned backbones in eval mode reads its trunk states from the same cache
(computing, rounding to fp16 and caching the missing rows), so only its top blocks run. A row's reward is then the
same whether its states were cached or just computed, and within fp16 rounding of the uncached reward.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moerm.atomic import atomic_write_text
from moerm.encoding.backbone import Backbone, decoder_position_ids, find_backbones
from moerm.encoding.blocks import transformer_blocks, trunk_states
from moerm.errors import UserError

INDEX_VERSION = 1
SHARD_TOKENS = 1 << 18  # tokens per shard before a new one starts (256k x H fp16: 192 MiB at H = 384)
TrunkRef = tuple[np.ndarray, int, int]  # (a shard's memory-mapped (tokens, H) array, first row, rows)


def default_trunk_dir() -> Path:
    return Path(os.environ.get("MOERM_CACHE", Path.home() / ".cache" / "moerm")) / "trunk"


@dataclass
class TrunkSpec:
    """Where a `top`-tuned backbone's trunk ends and where its states are cached."""

    first: int  # the first trained block; blocks [0, first) and the embeddings form the trunk
    ident: str  # backbone identity (content hash, dtype) the cache is keyed by
    cache_dir: Path
    like: Any = field(default=None, repr=False)  # what block `first - 1` returns (the form its stand-in returns)
    # set only inside trunk_cache_at_inference(owner): the cache this backbone scores from in eval mode
    inference: "InferenceTrunks | None" = field(default=None, repr=False, compare=False)


def first_trained_block(num_blocks: int, trainable_layers: int, backbone: str) -> int:
    """Index of the first of the top `trainable_layers` blocks; at least one block must stay in the trunk."""
    if not 1 <= trainable_layers < num_blocks:
        raise UserError(f"model.trainable_layers must be within 1..{num_blocks - 1} for backbone {backbone!r} "
                        f"({num_blocks} transformer blocks; training all of them is model.tuning=full); "
                        f"got {trainable_layers}")
    return num_blocks - trainable_layers


def row_key(encoding: dict[str, Any]) -> str:
    """A cache key for one sequence: the hash of its token ids (and token type ids, when it has them)."""
    h = hashlib.sha256(np.asarray(encoding["input_ids"], dtype=np.int64).tobytes())
    if "token_type_ids" in encoding:
        h.update(b"|types|")
        h.update(np.asarray(encoding["token_type_ids"], dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


class TrunkCache:
    """Cached trunk states (T, H) fp16 per token sequence, for one (backbone identity, first trained block)."""

    def __init__(self, root: Path, ident: str, first: int, hidden: int):
        self.ident, self.first, self.hidden = ident, first, hidden
        self.dir = Path(root) / hashlib.sha256(f"{ident}|block{first}|v{INDEX_VERSION}".encode()).hexdigest()[:20]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the trunk cache folder {self.dir}: {e.strerror or e}; set "
                            "model.trunk_cache to a writable folder") from None
        self.index: dict[str, TrunkRef] = {}
        self.skipped: list[str] = []  # shards ignored (truncated, foreign), for messages and tests
        for meta in sorted(self.dir.glob("shard-*.json")):
            self._open(meta)

    def _open(self, meta: Path) -> None:
        data = meta.with_suffix(".f16")
        try:
            info = json.loads(meta.read_text())
            rows, keys, offsets = int(info["tokens"]), info["keys"], info["offsets"]
            ok = (info.get("backbone") == self.ident and info.get("first") == self.first
                  and info.get("hidden") == self.hidden and data.is_file()
                  and data.stat().st_size == rows * self.hidden * 2 and len(keys) + 1 == len(offsets))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            self.skipped.append(meta.name)
            return
        array = np.memmap(data, dtype=np.float16, mode="r", shape=(rows, self.hidden)) if rows else np.zeros(
            (0, self.hidden), np.float16)
        for i, key in enumerate(keys):
            self.index[key] = (array, int(offsets[i]), int(offsets[i + 1]) - int(offsets[i]))

    def put(self, keys: Sequence[str], states: Sequence[torch.Tensor]) -> None:
        """Write one shard: the data first, then its index (atomically), so a shard without an index never loads."""
        stem = f"shard-{len(list(self.dir.glob('shard-*.json'))):06d}-{os.getpid()}-{os.urandom(3).hex()}"
        data, meta = self.dir / f"{stem}.f16", self.dir / f"{stem}.json"
        offsets = np.cumsum([0] + [s.shape[0] for s in states]).tolist()
        try:
            flat = torch.cat([s.to(torch.float16) for s in states]).cpu().numpy()
            with open(data, "wb") as fh:
                fh.write(np.ascontiguousarray(flat, dtype="<f2").tobytes())
            atomic_write_text(meta, json.dumps({"backbone": self.ident, "first": self.first, "hidden": self.hidden,
                                                "tokens": int(offsets[-1]), "keys": list(keys), "offsets": offsets}))
        except OSError as e:
            for f in (data, meta):
                f.unlink(missing_ok=True)
            raise UserError(f"cannot write the trunk cache in {self.dir}: {e.strerror or e} (read-only or full?); "
                            "set model.trunk_cache to a writable folder with room") from None
        self._open(meta)


def backbones_with_trunk(module: nn.Module) -> list[Any]:
    """The distinct `top`-tuned Backbones inside `module` (usually one)."""
    out: list[Any] = []
    for m in module.modules():
        if isinstance(m, Backbone) and m.trunk is not None and all(m is not o for o in out):
            out.append(m)
    return out


def encodings_of(dataset: Any) -> Iterator[dict[str, Any]]:
    """Every token encoding a dataset holds: the dict values of its items that carry `input_ids`."""
    for item in getattr(dataset, "items", None) or ():
        for value in item.values() if isinstance(item, dict) else ():
            if isinstance(value, dict) and "input_ids" in value:
                yield value


@torch.no_grad()
def compute_trunk(backbone: Any, encodings: Sequence[dict[str, Any]], encoder: Any, batch_size: int
                  ) -> list[torch.Tensor]:
    """Trunk states (T_i, H) of each encoding, in order (the model stops at the first trained block)."""

    spec: TrunkSpec = backbone.trunk
    _, blocks = transformer_blocks(backbone.model)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    out: list[torch.Tensor | None] = [None] * len(encodings)
    order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]["input_ids"]))
    try:
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            batch = {k: v.to(device) for k, v in encoder.pad([_tokens(encodings[i]) for i in rows]).items()}
            if backbone.decoder_positions:
                batch["position_ids"] = decoder_position_ids(batch["attention_mask"])
            hidden, like = trunk_states(backbone.model, blocks, spec.first, batch)  # (b, T, H)
            spec.like = spec.like if spec.like is not None else _form_of(like)
            mask = batch["attention_mask"].bool()
            for j, i in enumerate(rows):
                out[i] = hidden[j][mask[j]].float().cpu()  # (T_i, H): the real tokens only
    finally:
        backbone.train(was_training)
    return out  # type: ignore[return-value]


def _tokens(encoding: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in encoding.items() if k != "trunk"}


def _form_of(output: Any) -> Any:
    """A block's output reduced to its form: a tensor, or a tuple whose extra items are kept only when not tensors."""
    if isinstance(output, tuple):
        return (output[0], *(None if isinstance(x, torch.Tensor) else x for x in output[1:]))
    return output


def ensure_form(backbone: Any, encoder: Any) -> None:
    """Learn what the last trunk block returns (a tensor or a tuple) from a two-token pass, when no pass did yet."""
    if backbone.trunk.like is None:
        probe = encoder.encode_single("a")
        compute_trunk(backbone, [probe], encoder, 1)


def attach_trunk(module: nn.Module, datasets: Iterable[Any], batch_size: int = 64, progress: bool = True) -> int:
    """Give every encoding in `datasets` a reference to its trunk states (under key `trunk`), computing and caching
    the missing ones with the `top`-tuned backbone found in `module`. Returns how many sequences were computed.

    The main process computes first; the others then read the cache (multi-process runs).
    """
    from moerm.train import distributed

    backbones = backbones_with_trunk(module)
    if not backbones:
        return 0
    if len(backbones) > 1:
        raise ValueError("a component with two top-tuned backbones cannot share one trunk cache")
    backbone = backbones[0]
    spec: TrunkSpec = backbone.trunk
    datasets = [d for d in datasets if d is not None]
    encoder = next((getattr(d, "encoder", None) for d in datasets if getattr(d, "encoder", None) is not None), None)
    if encoder is None:
        return 0
    backbone.to(distributed.device())
    computed = 0
    with distributed.main_first():
        cache = TrunkCache(spec.cache_dir, spec.ident, spec.first, backbone.hidden_size)
        encs = [e for d in datasets for e in encodings_of(d)]
        keys = [row_key(e) for e in encs]
        todo: dict[str, dict[str, Any]] = {}
        for k, e in zip(keys, encs):
            if k not in cache.index:
                todo.setdefault(k, e)
        if todo:
            todo_keys = list(todo)
            bar = tqdm(total=len(todo_keys), desc="trunk states", disable=not progress or None, leave=False,
                       dynamic_ncols=True)
            chunk: list[str] = []
            tokens = 0  # in `chunk`
            for k in todo_keys:
                chunk.append(k)
                tokens += len(todo[k]["input_ids"])
                if tokens >= SHARD_TOKENS or k == todo_keys[-1]:
                    cache.put(chunk, compute_trunk(backbone, [todo[c] for c in chunk], encoder, batch_size))
                    bar.update(len(chunk))
                    computed += len(chunk)
                    chunk, tokens = [], 0
            bar.close()
        for k, e in zip(keys, encs):
            e["trunk"] = cache.index[k]
    ensure_form(backbone, encoder)
    return computed


def padded_states(encoded: Sequence[dict[str, Any]], width: int, left: bool) -> torch.Tensor:
    """The batch's trunk states (B, T, H) float32, zero at padded positions, on the tokens' padding side."""
    first = encoded[0]["trunk"]
    out = torch.zeros(len(encoded), width, first[0].shape[1])
    for b, e in enumerate(encoded):
        array, start, n = e["trunk"]
        if n != len(e["input_ids"]):
            raise ValueError(f"cached trunk states cover {n} tokens; the sequence has {len(e['input_ids'])}")
        rows = torch.from_numpy(np.array(array[start : start + n], dtype=np.float32))  # (T_i, H)
        if left:
            out[b, width - n :] = rows
        else:
            out[b, :n] = rows
    return out


class InferenceTrunks:
    """The trunk caches read while `trunk_cache_at_inference()` is active; rows computed in it wait in memory and
    are written as shards when they reach SHARD_TOKENS tokens and when the context ends."""

    def __init__(self) -> None:
        self.caches: dict[tuple[str, str, int, int], TrunkCache] = {}
        self.pending: dict[tuple[str, str, int, int], dict[str, torch.Tensor]] = {}  # new rows (T_i, H) fp16
        self.pending_tokens: dict[tuple[str, str, int, int], int] = {}  # tokens in `pending`, per cache
        self.hits = 0  # rows read from the cache
        self.computed = 0  # rows the trunk ran for

    def cache_of(self, spec: TrunkSpec, hidden: int) -> tuple[tuple[str, str, int, int], TrunkCache]:
        key = (str(spec.cache_dir), spec.ident, spec.first, hidden)
        if key not in self.caches:
            self.caches[key] = TrunkCache(spec.cache_dir, spec.ident, spec.first, hidden)
            self.pending[key], self.pending_tokens[key] = {}, 0
        return key, self.caches[key]

    def flush(self, key: tuple[str, str, int, int] | None = None) -> None:
        for k in [key] if key is not None else list(self.pending):
            rows = self.pending[k]
            if rows:
                self.caches[k].put(list(rows), list(rows.values()))
                self.pending[k], self.pending_tokens[k] = {}, 0

    @torch.no_grad()
    def states(self, backbone: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """The trunk states (B, T, H) of a padded batch (zero at padding) and the trunk's output form; missing rows are
        computed and cached."""
        spec: TrunkSpec = backbone.trunk
        key, cache = self.cache_of(spec, backbone.hidden_size)
        pending = self.pending[key]
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()  # (B, T)
        types = inputs.get("token_type_ids")
        keys = []
        for b in range(ids.shape[0]):
            enc: dict[str, Any] = {"input_ids": ids[b][mask[b]].cpu().numpy()}
            if types is not None:
                enc["token_type_ids"] = types[b][mask[b]].cpu().numpy()
            keys.append(row_key(enc))
        missing = [b for b, k in enumerate(keys) if k not in cache.index and k not in pending]
        if missing or spec.like is None:
            rows = missing or [0]  # all cached but the trunk's output form unknown: run one row to learn it
            _, blocks = transformer_blocks(backbone.model)
            hidden, like = trunk_states(backbone.model, blocks, spec.first, _rows_of(inputs, rows))
            spec.like = spec.like if spec.like is not None else _form_of(like)
            for j, b in enumerate(missing):
                if keys[b] not in pending:  # a batch may hold the same text twice
                    pending[keys[b]] = hidden[j][mask[b]].to(torch.float16).cpu()  # (T_b, H)
                    self.pending_tokens[key] += pending[keys[b]].shape[0]
            self.computed += len(missing)
            if self.pending_tokens[key] >= SHARD_TOKENS:
                self.flush(key)
                pending = self.pending[key]
        out = torch.zeros(*ids.shape, backbone.hidden_size)  # (B, T, H)
        for b, k in enumerate(keys):
            if k in pending:
                rows16 = pending[k]
            else:
                array, start, n = cache.index[k]
                rows16 = torch.from_numpy(np.array(array[start : start + n]))
            out[b, mask[b].cpu()] = rows16.float()
        self.hits += ids.shape[0] - len(missing)
        return out.to(ids.device), spec.like


@contextmanager
def trunk_cache_at_inference(owner: Any) -> Iterator[InferenceTrunks]:
    """While active, the `top`-tuned backbones reachable from `owner` (a system, a module) score in eval mode from
    cached trunk states (see the module docstring); nothing else changes. The cache is set on each backbone's
    `TrunkSpec`, never process-wide."""
    trunks = InferenceTrunks()
    specs = [b.trunk for b in find_backbones(owner) if b.trunk is not None]
    before = [s.inference for s in specs]
    for s in specs:
        s.inference = trunks
    try:
        yield trunks
    finally:
        for s, old in zip(specs, before):
            s.inference = old
        trunks.flush()


def inference_states(backbone: Any, inputs: dict[str, torch.Tensor], first: int | None = None
                     ) -> tuple[torch.Tensor, Any] | None:
    """The trunk states of a padded batch from the backbone's inference cache (`InferenceTrunks.states`); None when
    it has none, is training, has no trunk, or its trunk does not end at block `first` (when given)."""
    spec: TrunkSpec | None = backbone.trunk
    if spec is None or spec.inference is None or backbone.training or (first is not None and first != spec.first):
        return None
    return spec.inference.states(backbone, inputs)


def _rows_of(inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The given rows of a batch's model inputs (tensors, and per-row lists such as peft's adapter_names)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in inputs.items()}
