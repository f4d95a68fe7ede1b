"""moerm reward models out: a folder `AutoModelForSequenceClassification.from_pretrained` loads, same rewards.

Two formats, chosen by what reproduces the rewards exactly:
    native  an imported HF reward model (head `hf`): its own stock `*ForSequenceClassification` class again.
    code    any other baseline / baselora RM: stock HF classes cannot hold a moerm head (BERT and RoBERTa put a
            dense + tanh before the classifier, decoders' `score` has no bias, none pools by the mean), so the
            folder carries `modeling_moerm_reward.py` (plain code, `auto_map`) and loads with
            `trust_remote_code=True`. Its `model_type` is `moerm_reward`, which no stock class claims, so a load
            without `trust_remote_code=True` fails instead of giving the base's stock class with a fresh head. Its
            weight names are the stock ones (`<base prefix>.*`, `score.weight`) and its config class keeps the base's
            class name, so OpenRLHF's `--reward_pretrain` reads a decoder with last-token pooling and a linear head;
            the head's bias is in config.json as `mean: -bias, std: 1` (OpenRLHF applies them with
            `--normalize_reward`).
Both formats carry moerm's truncation: the tokenizer's `model_max_length` is the run's `max_length` and its
`truncation_side` is left (moerm keeps the response's start and trims the prompt from its left), and config.json's
`moerm_truncation` says so.
LoRA is merged into the base (peft merge_and_unload). Every export is loaded back and checked against moerm's own
rewards on probe pairs before it is moved into place. Weights are safetensors only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moerm.encoding import is_decoder
from moerm.errors import UnsupportedError, UserError
from moerm.hub.hf_import import PROBE, hf_head_modules, write_atomically

MODELING_FILE = "modeling_moerm_reward.py"
EXPORT_FILE = "moerm_export.json"
MODEL_TYPE = "moerm_reward"
EXPORTABLE = ("baseline", "baselora")
PROBES = [PROBE, ("Hi", "Hello! How can I help you today?"), ("Tell me a joke.", "No.")]


def pick_reward_model(system, domain: str | None):
    """The one RM of `system` to export: a baseline/baselora itself, or one RODOS domain RM with `domain`."""
    if domain is not None:
        if system.name != "rodos":
            raise UserError(f"--domain picks one domain RM of a rodos system; this is a {system.name} system")
        if domain not in system.rms:
            raise UserError(f"domain {domain!r} has no reward model in this rodos system; it has "
                            f"{', '.join(system.domains)}")
        return system.rms[domain]
    if system.name == "rodos":
        raise UnsupportedError("a rodos system is a router plus one RM per domain, and no single HF model holds it: "
                               f"export one domain RM with --domain D (domains: {', '.join(system.domains)})")
    if system.name not in EXPORTABLE:
        raise UnsupportedError(f"a {system.name} system has no Hugging Face equivalent (its reward is more than one "
                               "backbone and a head); export can write a baseline or baselora run, or one domain RM "
                               "of a rodos run (--domain D)")
    return system


def route_scale(system, domain: str | None):
    """The calibration map of the exported route (a RODOS domain, or a single RM's own), None when uncalibrated."""
    calibration = getattr(system, "calibration", None)
    if calibration is None or calibration.kind == "none":
        return None
    return calibration.scales.get(domain if domain is not None else "rm")


@torch.no_grad()
def fold_scale(rm, scale) -> bool:
    """Put the route's map into the head's last Linear (w / std, (b - mean) / std), so the exported model's logit
    is the calibrated reward; the RM then scores calibrated by itself (its own map is cleared). A head without a bias
    (decoders' stock `score`) cannot hold the offset: it is left raw and the map goes into config.json as OpenRLHF's
    `mean` / `std` (`--normalize_reward` applies them). Returns whether the map was folded."""
    from moerm.systems.calibration import Calibration

    head = rm.head
    last = head.out if hasattr(head, "out") else head.net[-1]
    if last.bias is None:
        return False
    last.weight.div_(scale.std)
    last.bias.sub_(scale.mean).div_(scale.std)
    rm.calibration = Calibration()
    return True


def _base_model(rm) -> torch.nn.Module:
    """The RM's backbone as a plain HF model: LoRA merged into a copy of the weights."""
    from peft import PeftModel

    model = rm.backbone.model
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    return model


def _state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _native(rm, base: torch.nn.Module, tmp: Path, pad_id: int | None) -> None:
    """An imported HF head: the stock class of the base's model type, its pooler/classifier filled from the head."""
    from transformers import AutoModelForSequenceClassification

    head = rm.head
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 1
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = pad_id
    seq = AutoModelForSequenceClassification.from_config(cfg)
    missing, unexpected = seq.base_model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"export: base weights do not fit {type(seq).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    dense, out = hf_head_modules(seq, cfg.model_type)
    with torch.no_grad():
        if dense is not None:
            dense.load_state_dict(head.dense.state_dict())
        out.load_state_dict(head.out.state_dict())
    seq.save_pretrained(tmp, safe_serialization=True)


def _code(rm, base: torch.nn.Module, tmp: Path, pad_id: int | None) -> dict[str, Any]:
    """Any moerm head: the base's weights under its own prefix, the head as `score`, and the modeling file."""
    from moerm.modules.heads import RewardHead

    head = rm.head
    if not isinstance(head, RewardHead):
        raise UnsupportedError(f"export: a {type(head).__name__} head has no exported form")
    m = rm.config.model
    prefix = getattr(type(base), "base_model_prefix", "") or "model"
    sd = _state(base, f"{prefix}.")
    if head.kind == "linear":  # RewardHead: Sequential(Dropout, Linear)
        sd.update(_state(head.net[1], "score."))
    else:  # Sequential(Linear, GELU, Dropout, Linear): the same indices under `score`
        sd.update(_state(head.net, "score."))
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 1
    cfg.architectures = ["MoermRewardModel"]
    cfg.auto_map = {"AutoConfig": "modeling_moerm_reward.MoermRewardConfig",
                    "AutoModelForSequenceClassification": "modeling_moerm_reward.MoermRewardModel"}
    decoder = rm.backbone.decoder_positions
    cfg.moerm_reward = {"pooling": rm.backbone.pooling, "head": head.kind, "head_hidden": m.head_hidden,
                        "head_dropout": m.head_dropout, "decoder_positions": bool(decoder),
                        "max_length": m.max_length, "base_model_type": base.config.model_type}
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = pad_id
    openrlhf = is_decoder(base.config) and rm.backbone.pooling == "last" and head.kind == "linear"
    if openrlhf:  # OpenRLHF's reward model has no bias: (reward - mean) / std with --normalize_reward restores it
        cfg.mean, cfg.std = -float(head.net[1].bias.detach()), 1.0
    config = json.loads(cfg.to_json_string(use_diff=False))
    config["model_type"] = MODEL_TYPE  # no stock class claims it: loading without trust_remote_code is an error
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    code = (Path(__file__).parent / MODELING_FILE).read_text()
    values = {"BASE_PREFIX": prefix, "BASE_CONFIG": type(base.config).__name__, "BASE_MODEL": type(base).__name__}
    for name, value in values.items():
        line = next((ln for ln in code.splitlines() if ln.startswith(f"{name} = ")), None)
        if line is None or code.count(line) != 1:
            raise RuntimeError(f"{MODELING_FILE}: expected one line starting {name} = ")
        code = code.replace(line, f'{name} = "{value}"  # written by moerm export')
    (tmp / MODELING_FILE).write_text(code)
    return {"openrlhf": openrlhf, "base_prefix": prefix}


def carry_truncation(tok, max_length: int) -> dict[str, Any]:
    """The tokenizer truncates as moerm does where it can: from the left (the prompt's start goes first, the response
    is kept), at the run's max_length. Returns what config.json records about it."""
    tok.truncation_side = "left"
    tok.model_max_length = max_length
    return {"max_length": max_length, "side": "left",
            "rule": "the response's start is kept; the prompt is trimmed from its left (moerm's PairEncoder)"}


@torch.no_grad()
def _verify(tmp: Path, rm, trust_remote_code: bool) -> float:
    """Load the export as a user would and compare its logits with moerm's rewards on padded probe pairs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp), trust_remote_code=trust_remote_code,
                                                               use_safetensors=True, dtype=torch.float32).eval()
    enc = rm.encoder
    batch = enc.pad([enc.encode(p, r) for p, r in PROBES])
    theirs = model(**batch).logits[:, 0].float()
    ours = torch.tensor(rm.score([p for p, _ in PROBES], [r for _, r in PROBES]).rewards)
    diff = float((theirs - ours).abs().max())
    if diff > 1e-4 * max(1.0, float(ours.abs().max())):
        raise UserError(f"export: the exported model gives {theirs.tolist()} where moerm gives {ours.tolist()} on probe "
                        "pairs; nothing was written. (A decoder whose pad token is the token its inputs end with "
                        "cannot be exported to a stock HF class, which skips trailing pad tokens.)")
    return diff


def export_run(run: str | Path, out: str | Path, domain: str | None = None, command: str = "") -> dict[str, Any]:
    """Write the RM of `run` (or its rodos domain `domain`) to `out` as a Hugging Face model folder."""
    from moerm.modules.heads import HFScoreHead
    from moerm.systems.base import find_model_dir, load_system
    from moerm.atomic import atomic_write_text

    model_dir = find_model_dir(run)
    system = load_system(model_dir, device="cpu", quantize="none")
    rm = pick_reward_model(system, domain)
    scale = route_scale(system, domain)
    folded = scale is not None and fold_scale(rm, scale)  # the exported reward on the run's common scale
    rm.model.eval()
    base = _base_model(rm)
    tok = rm.encoder.tokenizer
    native = isinstance(rm.head, HFScoreHead)
    info: dict[str, Any] = {"source": str(model_dir), "system": system.name, "domain": domain,
                            "format": "native" if native else "code", "tuning": rm.config.model.tuning,
                            "pooling": rm.backbone.pooling, "head": rm.config.model.head,
                            "max_length": rm.config.model.max_length,
                            "trust_remote_code": not native,
                            "calibration": None if scale is None else {
                                "mean": scale.mean, "std": scale.std,
                                "applied": "folded into the head" if folded else "config.json mean/std (OpenRLHF "
                                                                                 "--normalize_reward)"}}

    def fill(tmp: Path) -> None:
        if native:
            _native(rm, base, tmp, tok.pad_token_id)
            info["openrlhf"] = is_decoder(base.config)  # a bias-free `score` on the last token
        else:
            info.update(_code(rm, base, tmp, tok.pad_token_id))
        saved = copy.deepcopy(tok)
        info["truncation"] = carry_truncation(saved, rm.config.model.max_length)
        saved.save_pretrained(tmp)  # with its chat template, if it has one
        config = json.loads((tmp / "config.json").read_text())
        config["moerm_truncation"] = info["truncation"]
        if scale is not None and not folded:  # (reward - mean) / std puts the raw logit on the run's common scale
            config["mean"], config["std"] = scale.mean, scale.std
            config["moerm_calibration"] = info["calibration"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        info["max_abs_diff_on_probes"] = _verify(tmp, rm, trust_remote_code=not native)
        atomic_write_text(tmp / EXPORT_FILE, json.dumps({**info, "command": command}, indent=2))

    write_atomically(Path(out), fill)
    return {**info, "out": str(out)}
