"""The bench's inputs, prepared once in the output folder so every system and seed sees the same pairs.

- `OUT/backbone/tiny-random-bert/` when the backbone is `tiny-random-bert` (a seeded random 2-layer BERT with the
  embedded MiniLM tokenizer: smoke runs and tests);
- `OUT/data/train.jsonl.gz`, `OUT/data/test.jsonl.gz` and `OUT/data/data.json` (what was read, sampled, dropped);
- `OUT/data/plans.json`: every system's bench plan (`RewardSystem.bench_plan`; null: the shared pairs), e.g.
  DMoERM's tasks restricted to the domains and capabilities the data has labels for, or why a system is skipped;
  `OUT/data/<system>/` the pairs of a system whose plan restricts them.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moerm.bench.presets import TINY_BACKBONE, BenchConfig, resolve_path, system_domains, system_options
from moerm.config import ConfigError
from moerm.data.grouping import count_prompts, sample_round_robin
from moerm.data.readers import DataError, load_pairs, write_jsonl
from moerm.data.schema import PreferencePair
from moerm.runs import cap_per_domain
from moerm.atomic import atomic_write_text

WORDS_POS = "good great helpful correct clear kind".split()
WORDS_NEG = "bad awful wrong rude useless unclear".split()
FILLER = ("the a answer question about topic please explain tell me how why what is it this that and of to in reply "
          "yes no maybe one two three").split()
PLANS_FILE = "plans.json"
SYNTHETIC_DOMAINS = {  # domain -> prompt prefix (the router's cue)
    "qa": "question : tell me about the topic",
    "chat": "chat : hello how are you today",
    "summary": "summarize this text in one line",
}


# ------------------------------------------------------------------------------------------------ backbone

def tiny_backbone(out: Path, max_length: int) -> str:
    """A seeded random BERT (hidden 32, 2 layers) with the MiniLM tokenizer, written once into OUT/backbone."""
    path = out / "backbone" / TINY_BACKBONE
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return str(path.resolve())
    import torch
    from transformers import BertConfig, BertModel

    from moerm.encoding import load_tokenizer

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


def _expand(paths: Sequence[str], domains: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """A folder of domain folders is read per wanted domain only (hellaswag alone is 20k pairs).

    Returns the paths to read and the same paths as the user gave them (relative stays relative: the record).
    """
    read: list[str] = []
    shown: list[str] = []
    for raw in paths:
        if raw.startswith("hf:"):
            read.append(raw)
            shown.append(raw)
            continue
        p = resolve_path(raw)
        if domains and p.is_dir() and any((p / d).is_dir() for d in domains):
            wanted = [d for d in domains if (p / d).is_dir()]
            read += [str(p / d) for d in wanted]
            shown += [str(Path(raw) / d) for d in wanted]
        else:
            read.append(str(p))
            shown.append(raw)
    return read, shown


def as_given(text: str, read: Sequence[str], shown: Sequence[str]) -> str:
    """`text` (a note, a reader's message) with every path the bench read written as the user gave it.

    A relative path the working directory lacks is read from the repository (`resolve_path`): its messages would
    otherwise name this machine's absolute path.
    """
    for r, g in sorted(zip(read, shown), key=lambda rg: -len(rg[0])):
        if r != g:
            text = text.replace(r, g)
            absolute = str(Path(r).resolve())
            if absolute != r:
                text = text.replace(absolute, g)
    return text


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
        train_paths, train_shown = _expand(paths, cfg.domains)
        train, rep = load_pairs(train_paths, split="train", on_invalid=cfg.on_invalid)
        if rep.n_invalid:
            notes.append(as_given(f"training data: {rep.summary(max_reasons=2)}", train_paths, train_shown))
        if cfg.eval_data:
            eval_paths, eval_shown = _expand(cfg.eval_data, cfg.domains)
            split = "test" if all(Path(p).is_dir() for p in eval_paths) else None
        else:
            eval_paths, eval_shown, split = train_paths, train_shown, "test"
        try:
            test, rep = load_pairs(eval_paths, split=split, on_invalid=cfg.on_invalid)
        except DataError as e:
            raise DataError(f"no held-out pairs ({e}); give eval_data or test* files in the data folders") from None
        if rep.n_invalid:
            notes.append(as_given(f"held-out data: {rep.summary(max_reasons=2)}", eval_paths, eval_shown))
        source = {"train": train_shown, "eval": eval_shown}  # as given: no absolute paths of this machine
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
    # held out: the whole test split by default; a cap takes one pair per prompt in turn (never the first N records)
    test = sample_round_robin(test, cfg.max_eval_pairs_per_domain, cfg.data_seed)
    no_test = sorted(set(_counts(train)) - set(_counts(test)))
    if no_test:
        notes.append(f"domains without held-out pairs (trained on, not evaluated): {', '.join(no_test)}")
    if not test:
        raise DataError("no held-out pairs for the training domains")
    info = {"source": source, "train_pairs": _counts(train), "eval_pairs": _counts(test),
            "train_prompts": count_prompts(train), "eval_prompts": count_prompts(test),
            "eval_sample": ("every held-out pair" if cfg.max_eval_pairs_per_domain is None else
                            f"at most {cfg.max_eval_pairs_per_domain} pairs per domain, round-robin over prompts"),
            "notes": notes}
    return train, test, info


# ------------------------------------------------------------------------------------------------ plans

def plan_system(cfg: BenchConfig, system: str, train: Sequence[PreferencePair], test: Sequence[PreferencePair],
                out: Path) -> dict[str, Any] | None:
    """Ask the system's class for its bench plan and write its pairs into OUT/data/<system>/; None: no plan.

    The returned record (kept in OUT/data/plans.json) names its files relative to OUT, as results.json does.
    """
    from moerm.systems.base import BenchPlan, get_system_class

    folder = out / "data" / system
    data_domains = sorted({p.domain for p in train})
    own = system_domains(cfg, system)  # per_system.<system>.domains: the bench restricts it before its plan does
    restricted: dict[str, str] = {}
    if own is not None:
        restricted = {d: f"not in per_system.{system}.domains" for d in data_domains if d not in own}
        train = [p for p in train if p.domain in own]
        test = [p for p in test if p.domain in own]
    try:
        plan = get_system_class(system).bench_plan(system_options(cfg, system), train, test, list(cfg.seeds), folder)
    except ConfigError as e:
        raise ConfigError(f"per_system.{system}: {e}") from None
    if plan is None:
        if own is None:
            return None
        plan = BenchPlan(report=[f"Trained and evaluated on per_system.{system}.domains only."])
    if own is not None:
        plan.train = train if plan.train is None else plan.train
        plan.test = test if plan.test is None else plan.test
        plan.left_out = {**restricted, **plan.left_out}
    rec: dict[str, Any] = {"status": "skipped" if plan.skipped else "ok", "report": list(plan.report),
                           "left_out": dict(plan.left_out), "info": dict(plan.info)}
    if plan.skipped:
        rec["reason"] = plan.skipped
        return rec
    p_train = list(train) if plan.train is None else plan.train
    p_test = list(test) if plan.test is None else plan.test
    if not p_train or not p_test:
        rec.update(status="skipped", reason=f"its plan leaves no {'training' if not p_train else 'held-out'} pairs")
        return rec
    rec["domains"] = sorted({p.domain for p in p_train})
    rec["left_out"] = {d: plan.left_out.get(d, "left out by its plan") for d in data_domains if d not in rec["domains"]}
    rec["options"] = dict(plan.options)
    for split, pairs, given in (("train", p_train, plan.train), ("test", p_test, plan.test)):
        if given is None:
            rec[split] = f"data/{split}.jsonl.gz"
        else:
            write_jsonl(pairs, folder / f"{split}.jsonl.gz")
            rec[split] = f"data/{system}/{split}.jsonl.gz"
    return rec


# ------------------------------------------------------------------------------------------------ prepare

@dataclass
class Prepared:
    """Where the prepared inputs are, and what the report says about them.

    `plans`: system -> its bench plan record (see `plan_system`), for the systems that have one. Its file names are
    relative to `out`, the bench folder.
    """

    backbone: str
    out: Path
    info: dict[str, Any]
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def train_path(self) -> Path:
        return (self.out / "data" / "train.jsonl.gz").resolve()

    @property
    def test_path(self) -> Path:
        return (self.out / "data" / "test.jsonl.gz").resolve()

    def _plan_file(self, system: str | None, split: str) -> Path | None:
        plan = self.plans.get(system or "")
        return (self.out / plan[split]).resolve() if plan and plan.get("status") == "ok" else None

    def test_pairs(self, system: str | None = None) -> list[PreferencePair]:
        """The held-out pairs a system is evaluated on (its plan's, if it has one); None: all of them."""
        return load_pairs([self._plan_file(system, "test") or self.test_path])[0]

    def train_paths(self, system: str) -> list[str]:
        return [str(self._plan_file(system, "train") or self.train_path)]

    def extra_options(self, system: str) -> dict[str, Any]:
        """Options the system's plan adds over its per_system options (e.g. DMoERM's kept tasks)."""
        plan = self.plans.get(system)
        return dict(plan.get("options") or {}) if plan and plan.get("status") == "ok" else {}

    @property
    def skipped(self) -> dict[str, str]:
        """System -> why its plan keeps it out of the grid."""
        return {s: p.get("reason", "no plan") for s, p in self.plans.items() if p.get("status") != "ok"}


def prepare(cfg: BenchConfig, out: Path) -> Prepared:
    """Build (or reuse) the backbone, the sampled data and every system's bench plan in OUT."""
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
    prepared = Prepared(backbone, out, info)
    plans_path = data_dir / PLANS_FILE
    saved: dict[str, Any] = json.loads(plans_path.read_text()) if plans_path.exists() else {}
    missing = [s for s in cfg.systems if s not in saved]
    if missing:  # planned once per system; a system added in a rerun is planned then
        if train is None or test is None:
            train = load_pairs([prepared.train_path])[0]
            test = load_pairs([prepared.test_path])[0]
        for s in missing:
            saved[s] = plan_system(cfg, s, train, test, out)
        atomic_write_text(plans_path, json.dumps(saved, indent=2))
    prepared.plans = {s: saved[s] for s in cfg.systems if saved.get(s) is not None}
    return prepared
