"""The bench's inputs, prepared once in the output folder so every system and seed sees the same pairs.

- `OUT/backbone/tiny-random-bert/` when the backbone is `tiny-random-bert` (a seeded random 2-layer BERT with the
  embedded MiniLM tokenizer: smoke runs and tests);
- `OUT/data/train.jsonl.gz`, `OUT/data/test.jsonl.gz` and `OUT/data/data.json` (what was read, sampled, dropped);
- `OUT/data/dmoerm/` and `OUT/data/dmoerm.json`: the DMoERM plan (tasks restricted to the domains and capabilities
  the data has labels for), or why DMoERM is skipped.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moerm.bench.presets import TINY_BACKBONE, BenchConfig, resolve_path, system_options
from moerm.config import ConfigError
from moerm.data.readers import DataError, load_pairs, write_jsonl
from moerm.data.schema import PreferencePair
from moerm.runs import cap_per_domain
from moerm.train.checkpoint import atomic_write_text

WORDS_POS = "good great helpful correct clear kind".split()
WORDS_NEG = "bad awful wrong rude useless unclear".split()
FILLER = ("the a answer question about topic please explain tell me how why what is it this that and of to in reply "
          "yes no maybe one two three").split()
SYNTHETIC_DOMAINS = {  # domain -> prompt prefix (the router's cue)
    "qa": "question : tell me about the topic",
    "chat": "chat : hello how are you today",
    "summary": "summarize this text in one line",
}


@dataclass
class Prepared:
    """Where the prepared inputs are, and what the report says about them."""

    backbone: str
    train_path: Path
    test_path: Path
    info: dict[str, Any]
    dmoerm: dict[str, Any] = field(default_factory=dict)

    def test_pairs(self, system: str | None = None) -> list[PreferencePair]:
        """The held-out pairs a system is evaluated on (DMoERM: its tasks' domains); None: all of them."""
        path = Path(self.dmoerm["test"]) if system == "dmoerm" else self.test_path
        return load_pairs([path])[0]

    def train_paths(self, system: str) -> list[str]:
        return [self.dmoerm["train"]] if system == "dmoerm" else [str(self.train_path)]


# ------------------------------------------------------------------------------------------------ backbone

def tiny_backbone(out: Path, max_length: int) -> str:
    """A seeded random BERT (hidden 32, 2 layers) with the MiniLM tokenizer, written once into OUT/backbone."""
    path = out / "backbone" / TINY_BACKBONE
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return str(path.resolve())
    import torch
    from transformers import BertConfig, BertModel

    from moerm.backbone import load_tokenizer

    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=max(128, max_length))
    BertModel(cfg).save_pretrained(tmp, safe_serialization=True)
    torch.set_rng_state(state)
    load_tokenizer("minilm").save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return str(path.resolve())


def resolve_backbone(cfg: BenchConfig, out: Path) -> str:
    if cfg.backbone == TINY_BACKBONE:
        return tiny_backbone(out, cfg.max_length)
    local = resolve_path(cfg.backbone)
    return str(local.resolve()) if local.exists() else cfg.backbone


# ------------------------------------------------------------------------------------------------ data

def synthetic_pairs(n: int, seed: int, split: str) -> list[PreferencePair]:
    """An easy toy task per domain: the chosen reply has positive words, the rejected one negative words.

    Aspect scores for DMoERM: `helpfulness` agrees with the overall label; `clarity` is noisy (about a fifth of the
    pairs tie on it, and some disagree with the overall label).
    """
    rng = random.Random(f"{seed}-{split}")
    pairs = []
    for domain, prefix in SYNTHETIC_DOMAINS.items():
        for i in range(n):
            prompt = f"{prefix} " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8)))
            body = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
            chosen = " ".join(body + [rng.choice(WORDS_POS), rng.choice(WORDS_POS)])
            rejected = " ".join(body + [rng.choice(WORDS_NEG), rng.choice(WORDS_NEG)])
            clarity_c, clarity_r = rng.randint(2, 5), rng.randint(1, 4)
            pairs.append(PreferencePair(
                id=f"{domain}-{split}-{i}", domain=domain, prompt=prompt, chosen=chosen, rejected=rejected,
                aspects_chosen={"helpfulness": float(rng.randint(4, 5)), "clarity": float(clarity_c)},
                aspects_rejected={"helpfulness": float(rng.randint(1, 3)), "clarity": float(clarity_r)}))
    return pairs


def _expand(paths: Sequence[str], domains: Sequence[str] | None) -> list[str]:
    """A folder of domain folders is read per wanted domain only (hellaswag alone is 20k pairs)."""
    out: list[str] = []
    for raw in paths:
        if raw.startswith("hf:"):
            out.append(raw)
            continue
        p = resolve_path(raw).resolve()
        if domains and p.is_dir() and any((p / d).is_dir() for d in domains):
            out += [str(p / d) for d in domains if (p / d).is_dir()]
        else:
            out.append(str(p))
    return out


def _counts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    return dict(sorted(Counter(p.domain for p in pairs).items()))


def load_bench_data(cfg: BenchConfig) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
    """Read, filter to `domains` and sample the training and held-out pairs (the same for every cell)."""
    notes: list[str] = []
    if cfg.synthetic_data:
        n_train = cfg.max_train_pairs_per_domain or 64
        n_test = cfg.max_eval_pairs_per_domain or 24
        train, test = synthetic_pairs(n_train, cfg.data_seed, "train"), synthetic_pairs(n_test, cfg.data_seed, "test")
        source: dict[str, Any] = {"synthetic": True, "domains": list(SYNTHETIC_DOMAINS)}
        notes.append("synthetic toy data (positive vs negative words, aspect scores for DMoERM): a smoke test, "
                     "not a measurement of the systems' quality")
    else:
        paths = list(cfg.data)
        if not paths:
            raise ConfigError("data: give training data (files or folders), e.g. --data examples/data")
        existing = [p for p in paths if p.startswith("hf:") or resolve_path(p).exists()]
        if not existing and cfg.data_fallback:
            notes.append(f"{', '.join(paths)} not found: used the fallback {', '.join(cfg.data_fallback)}")
            paths = list(cfg.data_fallback)
        elif len(existing) < len(paths):
            missing = [p for p in paths if p not in existing]
            raise DataError(f"data: {missing[0]}: no such file or folder")
        train_paths = _expand(paths, cfg.domains)
        train, rep = load_pairs(train_paths, split="train", on_invalid=cfg.on_invalid)
        if rep.n_invalid:
            notes.append(f"training data: {rep.summary(max_reasons=2)}")
        if cfg.eval_data:
            eval_paths = _expand(cfg.eval_data, cfg.domains)
            split = "test" if all(Path(p).is_dir() for p in eval_paths) else None
        else:
            eval_paths, split = train_paths, "test"
        try:
            test, rep = load_pairs(eval_paths, split=split, on_invalid=cfg.on_invalid)
        except DataError as e:
            raise DataError(f"no held-out pairs ({e}); give eval_data or test* files in the data folders") from None
        if rep.n_invalid:
            notes.append(f"held-out data: {rep.summary(max_reasons=2)}")
        source = {"train": train_paths, "eval": eval_paths}
    if cfg.domains:
        present = {p.domain for p in train}
        missing = [d for d in cfg.domains if d not in present]
        if missing:
            notes.append(f"domains not in the data (left out): {', '.join(missing)}")
        train = [p for p in train if p.domain in cfg.domains]
        test = [p for p in test if p.domain in cfg.domains]
    if not train:
        raise DataError("no training pairs left (check data and domains)")
    train = cap_per_domain(train, cfg.max_train_pairs_per_domain, cfg.data_seed)
    test = cap_per_domain(test, cfg.max_eval_pairs_per_domain, cfg.data_seed)
    no_test = sorted(set(_counts(train)) - set(_counts(test)))
    if no_test:
        notes.append(f"domains without held-out pairs (trained on, not evaluated): {', '.join(no_test)}")
    if not test:
        raise DataError("no held-out pairs for the training domains")
    info = {"source": source, "train_pairs": _counts(train), "eval_pairs": _counts(test), "notes": notes}
    return train, test, info


# ------------------------------------------------------------------------------------------------ DMoERM plan

def _load_tasks(cfg: BenchConfig) -> tuple[list[Any], str]:
    from moerm.systems.tasks import load_tasks_file, parse_tasks

    if cfg.dmoerm_tasks is not None:
        return parse_tasks(cfg.dmoerm_tasks, "dmoerm_tasks"), "dmoerm_tasks (inline)"
    if not cfg.dmoerm_tasks_file:
        raise ConfigError("dmoerm needs tasks: set dmoerm_tasks_file or dmoerm_tasks")
    path = resolve_path(cfg.dmoerm_tasks_file)
    return load_tasks_file(path), str(cfg.dmoerm_tasks_file)


def plan_dmoerm(cfg: BenchConfig, train: Sequence[PreferencePair], test: Sequence[PreferencePair]) -> dict[str, Any]:
    """Which tasks, domains and capabilities DMoERM can train on this data; or why it cannot run.

    A task keeps the domains present in the data, and the capabilities with at least `min_capability_pairs`
    aspect-labelled pairs (ties dropped) in split A for every seed; a task with no domain or capability left is
    dropped. DMoERM then trains and is evaluated on the kept tasks' domains only.
    """
    from moerm.labeling.aspects import capability_pairs
    from moerm.systems.dmoerm import DMoERMOptions, split_ab

    tasks, source = _load_tasks(cfg)
    opts = system_options(cfg, "dmoerm")
    defaults = DMoERMOptions()
    min_pairs = int(opts.get("min_capability_pairs", defaults.min_capability_pairs))
    share_a = float(opts.get("split_a", defaults.split_a))
    if opts.get("use_aspects", True) is False or opts.get("capability_labels"):
        raise ConfigError("per_system.dmoerm.options: the bench takes capability labels from aspect scores only "
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
            fewest = min(len(capability_pairs(split_ab(pairs, share_a, seed)[0], c)[0]) for seed in cfg.seeds)
            if fewest >= min_pairs:
                caps.append(c)
            else:
                dropped.append(f"task {t.name}: capability {c} has {fewest} aspect-labelled pairs in split A "
                               f"(< min_capability_pairs {min_pairs})")
        if not caps:
            dropped.append(f"task {t.name}: no capability with enough aspect labels in {', '.join(present)}")
            continue
        kept[t.name] = {"domains": present, "capabilities": caps}
    plan: dict[str, Any] = {"tasks_source": source, "dropped": dropped}
    if not kept:
        plan.update(status="skipped", reason=(
            f"the data has no aspect labels for the domains of {source} (its tasks cover "
            f"{', '.join(sorted({d for t in tasks for d in t.domains}))}; the data has {', '.join(data_domains)})"))
        return plan
    domains = sorted(d for t in kept.values() for d in t["domains"])
    plan.update(status="ok", tasks=kept, domains=domains,
                left_out_domains=[d for d in data_domains if d not in domains])
    return plan


# ------------------------------------------------------------------------------------------------ prepare

def prepare(cfg: BenchConfig, out: Path) -> Prepared:
    """Build (or reuse) the backbone, the sampled data and the DMoERM plan in OUT."""
    backbone = resolve_backbone(cfg, out)
    data_dir = out / "data"
    info_path = data_dir / "data.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        train = test = None
    else:
        train, test, info = load_bench_data(cfg)
        write_jsonl(train, data_dir / "train.jsonl.gz")
        write_jsonl(test, data_dir / "test.jsonl.gz")
        atomic_write_text(info_path, json.dumps(info, indent=2))  # last: marks the data complete
    prepared = Prepared(backbone, (data_dir / "train.jsonl.gz").resolve(), (data_dir / "test.jsonl.gz").resolve(), info)
    if "dmoerm" in cfg.systems:
        plan_path = data_dir / "dmoerm.json"
        if plan_path.exists():
            plan = json.loads(plan_path.read_text())
        else:
            if train is None:
                train = load_pairs([prepared.train_path])[0]
                test = load_pairs([prepared.test_path])[0]
            plan = plan_dmoerm(cfg, train, test or [])
            if plan["status"] == "ok":
                keep = set(plan["domains"])
                d_train = [p for p in train if p.domain in keep]
                d_test = [p for p in test or [] if p.domain in keep]
                if not d_test:
                    plan.update(status="skipped", reason="no held-out pairs in the domains DMoERM covers")
                else:
                    plan["train"] = str(write_jsonl(d_train, data_dir / "dmoerm" / "train.jsonl.gz").resolve())
                    plan["test"] = str(write_jsonl(d_test, data_dir / "dmoerm" / "test.jsonl.gz").resolve())
            atomic_write_text(plan_path, json.dumps(plan, indent=2))
        prepared.dmoerm = plan
    return prepared
