"""Hugging Face sequence-classification reward models in: a `baseline` system that keeps the trained score head.

An `AutoModelForSequenceClassification` RM (num_labels 1) becomes a baseline system with tuning `full`: its body
is the backbone, its head an `HFScoreHead` holding the HF pooler/classifier weights (`model.head: hf`), pooled as
the HF class pools (`cls` for BERT / DeBERTa-v2 / RoBERTa, `last` for decoders). Weights load from safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moerm.errors import UserError

SEQ_CLS = "ForSequenceClassification"
ENCODER_TYPES = ("bert", "deberta-v2", "roberta", "xlm-roberta")
DECODER_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gemma", "gemma2", "phi3")
PROBE = ("How do I sort a list in Python?", "Use sorted(xs), or xs.sort() to sort in place.")
IMPORT_FILE = "import.json"


@dataclass
class HFRewardModelInfo:
    """What `inspect_hf_rm` found in a folder: its config, family and the pooling its HF class uses."""

    path: Path
    config: Any  # transformers.PretrainedConfig
    architecture: str
    decoder: bool

    @property
    def pooling(self) -> str:
        return "last" if self.decoder else "cls"


def sequence_classifier_architecture(path: str | Path) -> str | None:
    """The `*ForSequenceClassification` architecture a local model folder's config.json names, else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return next((a for a in archs if isinstance(a, str) and a.endswith(SEQ_CLS)), None)


def backbone_head_warning(path: str | Path) -> str | None:
    """The message for a `--backbone` that is a sequence-classification RM (its trained head would be dropped)."""
    arch = sequence_classifier_architecture(path)
    if arch is None:
        return None
    return (f"{path} is a sequence-classification model ({Path(path) / 'config.json'}: architectures {arch}): as a "
            "backbone its trained score head is dropped and a new head trained from scratch. To use this reward "
            f"model as it is, run `moerm import-hf {path} --out RUN`")


def require_safetensors(path: Path) -> None:
    """A folder must hold safetensors weights; pickled ones (.bin, .pt) are refused before anything reads them."""
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise UserError(f"{path}: weights only as pickle ({', '.join(pickled[:3])}); moerm loads safetensors only. "
                        "Convert them (e.g. load with transformers and `save_pretrained(DIR, safe_serialization=True)`"
                        " where you trust the file), then import DIR")
    raise UserError(f"{path}: no model.safetensors (or model.safetensors.index.json) in the folder")


def inspect_hf_rm(path: str | Path) -> HFRewardModelInfo:
    """Check that `path` is a local HF reward model moerm can import; every problem is a UserError naming it."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such folder (give a local Hugging Face model folder; Hub names are not fetched)")
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: no config.json: not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for an unreadable config
        raise UserError(f"{p / 'config.json'}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    arch = sequence_classifier_architecture(p)
    if arch is None:
        archs = getattr(config, "architectures", None)
        raise UserError(f"{p / 'config.json'}: architectures {archs} names no *{SEQ_CLS} class; import-hf takes a "
                        "sequence-classification reward model (for a plain base model use `moerm train --backbone`)")
    model_type = config.model_type
    if model_type not in ENCODER_TYPES + DECODER_TYPES:
        raise UserError(f"{p / 'config.json'}: model_type {model_type!r} ({arch}) is not supported by import-hf; "
                        f"supported: {', '.join(ENCODER_TYPES + DECODER_TYPES)}")
    if int(config.num_labels) != 1:
        raise UserError(f"{p / 'config.json'}: num_labels is {config.num_labels}; a reward model has one output "
                        "(num_labels 1)")
    require_safetensors(p)
    return HFRewardModelInfo(p.resolve(), config, arch, model_type in DECODER_TYPES)


def hf_head_modules(model: torch.nn.Module, model_type: str) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """(dense, out) of a stock *ForSequenceClassification head: BERT's pooler dense + classifier, DeBERTa-v2's
    ContextPooler dense + classifier, RoBERTa's classification head, or (None, score) for decoders."""
    if model_type == "bert":
        return model.bert.pooler.dense, model.classifier
    if model_type == "deberta-v2":
        return model.pooler.dense, model.classifier
    if model_type in ("roberta", "xlm-roberta"):
        return model.classifier.dense, model.classifier.out_proj
    return None, model.score


def _head_from_hf(model: torch.nn.Module, info: HFRewardModelInfo) -> torch.nn.Module:
    """An HFScoreHead with the HF model's pooler/classifier weights copied in."""
    from moerm.modules.heads import HFScoreHead

    head = HFScoreHead.for_config(info.config)
    dense, out = hf_head_modules(model, info.config.model_type)
    with torch.no_grad():
        if dense is not None:
            head.dense.load_state_dict(dense.state_dict())
        head.out.load_state_dict(out.state_dict())
    return head


def hf_pooling_problem(info: HFRewardModelInfo, last_token: int) -> str | None:
    """Why moerm's last-token pooling would not be the HF class's, for a decoder: HF scores the last token that is
    not the pad token, moerm the last real token (from the attention mask); they differ when that token is the pad."""
    pad = getattr(info.config, "pad_token_id", None)
    if info.decoder and pad is not None and last_token == pad:
        return (f"{info.path / 'config.json'}: pad_token_id {pad} is also the token moerm ends every input with (the "
                "EOS or the chat template's last token), and the HF class scores the last token that is not padding, "
                "so it skips that token: moerm cannot reproduce its rewards. Give the model a distinct pad token "
                "(tokenizer and config.pad_token_id) if it was trained that way")
    return None


def load_hf_reward_model(path: str | Path, max_length: int | None = None, seed: int = 0):
    """A `baseline` system (not saved) holding the HF reward model at `path`, head and all; it is checked on a
    probe pair to give the HF model's own logits."""
    from transformers import AutoModelForSequenceClassification

    from moerm.config import ModelConfig, RunConfig, TrainConfig
    from moerm.encoding import Backbone
    from moerm.encoding.pairs import max_positions
    from moerm.systems.baseline import BaselineSystem

    info = inspect_hf_rm(path)
    limit = max_positions(info.config)
    if max_length is None:
        max_length = min(512, limit) if limit else 512
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(info.path), use_safetensors=True,
                                                                   dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign weight file
        raise UserError(f"{info.path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model.eval()
    probe = _hf_probe(model, info, max_length)  # before the pooler moves into the head
    head = _head_from_hf(model, info)
    base = model.base_model
    if getattr(base, "pooler", None) is not None:
        base.pooler = None  # its weights live in the head now (as in load_backbone, the pooler is never used)
    if info.decoder and hasattr(base.config, "use_cache"):
        base.config.use_cache = False
    m = ModelConfig(backbone=str(info.path), pooling=info.pooling, max_length=max_length, head="hf", tuning="full")
    config = RunConfig(system="baseline", model=m, train=TrainConfig(seed=seed))
    system = BaselineSystem(config, backbone=Backbone(base, info.pooling), head=head, tokenizer_path=str(info.path))
    system.model.eval()
    ours = float(system.score([PROBE[0]], [PROBE[1]]).rewards[0])
    if abs(ours - probe) > 1e-4 * max(1.0, abs(probe)):  # a wrong head or pooling is refused, never saved
        raise UserError(f"{info.path}: the imported head gives {ours:.6f} on a probe pair where the HF model gives "
                        f"{probe:.6f}; this architecture ({info.architecture}) is not reproduced exactly")
    return system


@torch.no_grad()
def _hf_probe(hf_model: torch.nn.Module, info: HFRewardModelInfo, max_length: int) -> float:
    """The HF model's logit on a probe pair, as moerm encodes it; a decoder whose pooling moerm cannot match is
    refused here."""
    from moerm.encoding import make_encoder

    encoder = make_encoder(str(info.path), max_length)
    enc = encoder.encode(*PROBE)
    problem = hf_pooling_problem(info, enc["input_ids"][-1])
    if problem:
        raise UserError(problem)
    return float(hf_model(**encoder.pad([enc])).logits[0, 0])



def _fresh_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another --out")


def write_atomically(out: Path, fill) -> Path:
    """Build a folder under a temporary name beside `out`, then rename it into place (nothing half-written)."""
    out = Path(out)
    _fresh_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.is_dir():  # an empty folder the user made: replace it
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_hf(path: str | Path, out: str | Path, max_length: int | None = None, command: str = "") -> dict[str, Any]:
    """Make the run folder `out` (config.yaml, command.txt, import.json, model/) from the HF reward model at `path`."""
    from moerm.atomic import atomic_write_text

    system = load_hf_reward_model(path, max_length)
    info = inspect_hf_rm(path)
    summary = {"source": str(info.path), "architecture": info.architecture, "model_type": info.config.model_type,
               "pooling": info.pooling, "head": system.head.style, "max_length": system.config.model.max_length,
               "params": sum(p.numel() for p in system.model.parameters())}

    def fill(tmp: Path) -> None:
        system.save(tmp / "model")
        atomic_write_text(tmp / "config.yaml", system.config.to_yaml())
        atomic_write_text(tmp / "command.txt", command + "\n")
        atomic_write_text(tmp / IMPORT_FILE, json.dumps(summary, indent=2))

    write_atomically(Path(out), fill)
    return {**summary, "run": str(out)}
