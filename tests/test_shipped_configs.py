"""Every YAML shipped under configs/ builds (and trains): a default change can never break a shipped config silently.

One row per file, resolved by the public entry point a user runs it with, on a tiny random backbone of the kind the
config names (an encoder for `minilm` and DeBERTa, a decoder for GPT-2/Llama/Qwen names) and a small data budget:

- system configs (`configs/*.yaml`): `moerm train -c CONFIG --data ... --backbone TINY`, with the `--data` of the
  config's own "Tested with:" header (examples/data otherwise), one optimizer step per component;
- bench presets (`configs/bench/*.yaml`): resolved as `moerm bench --preset NAME` resolves it (`load_bench_config`),
  then every system cell of every seed built (the cell's run config, then its system); training a cell is what the
  system rows do, and a whole bench per preset would cost about a minute of CPU each;
- DMoERM task files (`configs/tasks/*.yaml`): `moerm train --system dmoerm --set options.tasks_file=FILE` on the
  domains the file names (examples/data where it has them, else toy pairs with an aspect score per capability).

Only sizes are overridden (backbone, pairs per domain, steps; DMoERM's options.min_capability_pairs, a data size):
every other setting is the file's, and the system rows check that each of its model/options values reached the run.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModel, PreTrainedTokenizerFast
from typer.testing import CliRunner

from moerm.cli import app
from moerm.data.readers import write_jsonl
from moerm.data.schema import PreferencePair

from conftest import TOY_WORDS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXAMPLES = ROOT / "examples" / "data"
SYSTEM_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
PRESETS = sorted(p.stem for p in (CONFIGS / "bench").glob("*.yaml"))
TASK_FILES = sorted(p.name for p in (CONFIGS / "tasks").glob("*.yaml"))
PAIRS_PER_DOMAIN = 16
# DMoERM refuses a capability with fewer aspect-labelled pairs in its split A than this (default 16): a size too
MIN_CAPABILITY_PAIRS = 2

runner = CliRunner()


def one_step(system: str, prefix: str = "") -> list[str]:
    """--set overrides that train each component of `system` for one optimizer step: `train.max_steps` and, for
    the component kinds the system declares with defaults of their own (a router's epochs), theirs too."""
    from moerm.systems.base import get_system_class

    kinds = getattr(get_system_class(system), "component_defaults", {})
    sets = ["train.max_steps=1", *(f"components.{k}.train.max_steps=1" for k in kinds)]
    if system == "dmoerm":
        sets.append(f"options.min_capability_pairs={MIN_CAPABILITY_PAIRS}")
    return [f"{prefix}{s}" for s in sets]


def as_args(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


# ---------------------------------------------------------------------------------------------- tiny backbones
def backbone_kind(name: str) -> str | None:
    """The tiny architecture standing in for a config's backbone; None: the bench builds its own tiny one."""
    lowered = name.lower()
    if lowered == "tiny-random-bert":
        return None
    for key, kind in (("deberta", "deberta-v3"), ("gpt2", "gpt2"), ("llama", "llama"), ("qwen", "qwen2"),
                      ("minilm", "bert"), ("bert", "bert")):
        if key in lowered:
            return kind
    raise AssertionError(f"a shipped config names backbone {name!r}: add its kind to backbone_kind()")


def make_tiny_backbone(kind: str, path: Path) -> str:
    """A 3-block, 32-wide random model of `kind` (3 blocks: `top` tuning with 2 trainable layers keeps a trunk) with
    a WordLevel tokenizer over the toy words, saved to `path`; encoders add [CLS]/[SEP], decoders pad with EOS."""
    words = sorted(set(TOY_WORDS) | {w for d in DOMAIN_WORDS for w in d.split()})
    decoder = kind in ("gpt2", "llama", "qwen2")
    # decoders: bos 1, eos 2, pad 3 (tiny_config's Llama/Qwen ids); GPT-2 pads with its EOS
    specials = ["<unk>", "<s>", "</s>", "<pad>"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0 if decoder else 1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>" if kind == "gpt2" else "<pad>", model_max_length=512)
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    fast.save_pretrained(path)
    cfg = tiny_config(kind, vocab_size=len(vocab), layers=3)
    if kind == "gpt2":
        cfg.n_positions = 512
        cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = vocab["</s>"]
    else:
        cfg.max_position_embeddings = 512
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """kind -> folder of its tiny backbone (`make_tiny_backbone`)."""
    return {kind: make_tiny_backbone(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
            for kind in ("bert", "deberta-v3", "gpt2", "llama", "qwen2")}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- toy data
DOMAIN_WORDS = ["tell me about the topic", "what is this and that", "please explain how", "why is it so",
                "answer the question", "reply to this"]


def toy_domain(root: Path, domain: str, aspects: list[str], index: int) -> None:
    """train/test pairs of one domain: a prompt prefix of its own, the chosen reply with positive words; every
    aspect agrees with the label (score 4-5 vs 1-3), so a capability expert has labels."""
    rng = random.Random(f"{domain}-{index}")
    prefix = f"{DOMAIN_WORDS[index % len(DOMAIN_WORDS)]} {TOY_WORDS[12 + index % 20]}"
    pos, neg, filler = TOY_WORDS[:6], TOY_WORDS[6:12], TOY_WORDS[12:]
    for split, n in (("train", PAIRS_PER_DOMAIN), ("test", 8)):
        pairs = []
        for i in range(n):
            body = [rng.choice(filler) for _ in range(rng.randint(2, 5))]
            extra = {}
            if aspects:
                extra = {"aspects_chosen": {a: float(rng.randint(4, 5)) for a in aspects},
                         "aspects_rejected": {a: float(rng.randint(1, 3)) for a in aspects}}
            pairs.append(PreferencePair(
                id=f"{domain}-{split}-{i}", domain=domain,
                prompt=f"{prefix} " + " ".join(rng.choice(filler) for _ in range(rng.randint(2, 5))),
                chosen=" ".join(body + [rng.choice(pos), rng.choice(pos)]),
                rejected=" ".join(body + [rng.choice(neg), rng.choice(neg)]), **extra))
        write_jsonl(pairs, root / domain / f"{split}.jsonl")


def copy_or_toy(domains: list[str], root: Path) -> list[str]:
    """Each domain's folder under `root`: examples/data's files where it has the domain (its real aspect names),
    else toy pairs with an aspect score for every capability a shipped DMoERM tasks file gives the domain."""
    caps: dict[str, list[str]] = {}
    for tasks_file in sorted((CONFIGS / "tasks").glob("*.yaml")):
        for d, names in task_capabilities(tasks_file).items():
            caps[d] = [*caps.get(d, []), *(n for n in names if n not in caps.get(d, []))]
    for i, domain in enumerate(domains):
        if (EXAMPLES / domain).is_dir():
            shutil.copytree(EXAMPLES / domain, root / domain)
        else:
            toy_domain(root, domain, caps.get(domain, []), i)
    return [str(root / d) for d in domains]


def task_capabilities(tasks_file: Path) -> dict[str, list[str]]:
    """domain -> the capability names of the task(s) a DMoERM tasks file puts it in."""
    tasks = yaml.safe_load(tasks_file.read_text())["tasks"]
    caps: dict[str, list[str]] = {}
    for spec in tasks.values():
        names = list(spec["capabilities"])  # a list of names, or a mapping name -> description
        for d in spec.get("domains") or []:
            caps[d] = [*caps.get(d, []), *(n for n in names if n not in caps.get(d, []))]
    return caps


def header_data_args(config: Path) -> list[str]:
    """The `--data` arguments of the config's "Tested with:" header (continued on '#   ' lines); [] if none."""
    lines = config.read_text().splitlines()
    header: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith("# Tested with:"):
            header.append(line.split(":", 1)[1])
            header += [ln[1:] for ln in lines[i + 1 :] if ln.startswith("#   ")][:5]
            break
    words = shlex.split(" ".join(header).split("(")[0]) if header else []
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--data"]


def _ok(result: Any, what: str) -> None:
    assert result.exit_code == 0, f"{what} failed (exit {result.exit_code}):\n{result.output[-3000:]}"


# ---------------------------------------------------------------------------------------------- the table
def test_the_table_covers_every_yaml_under_configs() -> None:
    every = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.y*ml")}
    tabled = {*SYSTEM_CONFIGS, *(f"bench/{p}.yaml" for p in PRESETS), *(f"tasks/{t}" for t in TASK_FILES)}
    assert every == tabled, f"YAML files no row builds: {sorted(every - tabled)}"
    assert len(SYSTEM_CONFIGS) >= 10 and len(PRESETS) >= 4 and len(TASK_FILES) >= 2


@pytest.mark.parametrize("name", SYSTEM_CONFIGS)
def test_system_config_trains(name: str, tiny_backbones: dict[str, str], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = CONFIGS / name
    declared = yaml.safe_load(config.read_text())
    data = header_data_args(config) or ["examples/data"]
    monkeypatch.chdir(ROOT)  # the headers' paths (and options.tasks_file) are relative to the repository
    kind = backbone_kind(declared.get("model", {}).get("backbone", "minilm"))
    out = tmp_path / "run"
    args = ["train", "-c", str(config), *(a for d in data for a in ("--data", d)), "--out", str(out),
            "--backbone", tiny_backbones[kind or "bert"], "--no-eval", "--no-progress",
            *as_args([f"data.max_train_pairs_per_domain={PAIRS_PER_DOMAIN}", *one_step(declared["system"])])]
    _ok(runner.invoke(app, args), f"moerm train -c configs/{name}")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["system"] == declared["system"] and (out / "model" / "system.json").exists()
    for section in ("options", "model"):  # what the file sets is what the run used (resolved, never dropped)
        for key, value in (declared.get(section) or {}).items():
            if section == "model" and key == "backbone":
                continue
            if key in saved[section] and not (key == "tasks_file" and saved[section].get("tasks")):
                assert saved[section][key] == value, f"{name}: {section}.{key} = {saved[section][key]!r}, not {value!r}"


@pytest.mark.parametrize("preset", PRESETS)
def test_bench_preset_builds_every_cell(preset: str, tiny_backbones: dict[str, str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset resolved as `moerm bench --preset NAME` resolves it (its backbone swapped for a tiny one of the
    same kind), then every system's cell config of every seed built into its system."""
    from moerm.bench import load_bench_config
    from moerm.bench.presets import run_config
    from moerm.systems import build_system

    declared = yaml.safe_load((CONFIGS / "bench" / f"{preset}.yaml").read_text())
    monkeypatch.chdir(ROOT)  # per_system options name configs/tasks/... relative to the repository
    kind = backbone_kind(declared.get("backbone", "minilm"))
    backbone = tiny_backbones[kind or "bert"]
    cfg = load_bench_config(preset, overrides=[f"backbone={backbone}"])
    assert cfg.name == declared["name"] and cfg.systems == declared["systems"]
    built = []
    for system in cfg.systems:
        for seed in cfg.seeds:
            cell = run_config(cfg, system, seed, backbone, [str(tmp_path / "data")],
                              feature_cache=str(tmp_path / "features"), trunk_cache=str(tmp_path / "trunk"))
            assert cell.system == system and cell.train.seed == seed
            for section in ("options", "model"):  # the preset's per-system settings reach the cell
                own = ((declared.get("per_system") or {}).get(system) or {}).get(section) or {}
                assert {k: cell.to_dict()[section].get(k) for k in own} == own, f"{preset}: {system}.{section}"
            built.append(build_system(cell).name)
    assert built == [s for s in cfg.systems for _ in cfg.seeds]


@pytest.mark.parametrize("name", TASK_FILES)
def test_task_file_builds_its_dmoerm(name: str, tiny_backbones: dict[str, str], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tasks_file = CONFIGS / "tasks" / name
    caps = task_capabilities(tasks_file)
    assert caps, f"{name}: no task names a domain"
    data = copy_or_toy(sorted(caps), tmp_path / "data")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = ["train", "--system", "dmoerm", "--set", f"options.tasks_file=configs/tasks/{name}",
            *(a for d in data for a in ("--data", d)), "--out", str(out), "--backbone", tiny_backbones["bert"],
            "--no-eval", "--no-progress",
            *as_args(["model.max_length=64", f"data.max_train_pairs_per_domain={PAIRS_PER_DOMAIN}", *one_step("dmoerm")])]
    _ok(runner.invoke(app, args), f"moerm train --system dmoerm with configs/tasks/{name}")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    tasks = yaml.safe_load(tasks_file.read_text())["tasks"]
    assert set(saved["options"]["tasks"]) == set(tasks)  # every task of the file was built
    for task, spec in tasks.items():
        assert re.sub(r"\W", "", str(sorted(saved["options"]["tasks"][task]["capabilities"]))) == \
            re.sub(r"\W", "", str(sorted(spec["capabilities"])))
