"""An exported RM as a user without moerm loads it: in a fresh process where `import moerm` fails.

A `code` export loaded without `trust_remote_code=True` must raise (never the stock class with a fresh head); with
it, and a `native` export without it, the logits equal `moerm score` within 1e-5, on short pairs and on pairs past
max_length (the exported tokenizer trims the prompt from the left as moerm does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import toy_pairs
from hubutil import PAIRS
from test_hf_export import train_tiny

from moerm.hub.hf_export import export_run
from moerm.hub.hf_import import import_hf
from moerm.systems.base import load_system

# Run in a fresh interpreter: moerm is made unimportable, then the export is loaded as a transformers user would.
SCRIPT = r"""
import json, sys
sys.modules["moerm"] = None  # `import moerm` raises ImportError in this process
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
args = json.loads(sys.argv[1])
out = {"moerm_importable": True}
try:
    import moerm  # noqa: F401
except ImportError:
    out["moerm_importable"] = False
try:
    AutoModelForSequenceClassification.from_pretrained(args["dir"])
    out["stock_load"] = "loaded"
except Exception as e:  # noqa: BLE001 - whatever transformers raises, it must raise
    out["stock_load"] = f"{type(e).__name__}: {e}"
model = AutoModelForSequenceClassification.from_pretrained(args["dir"], trust_remote_code=args["trust"]).eval()
if args.get("ids"):  # token ids as moerm encodes them (a decoder's chat layout), right-padded
    n = max(map(len, args["ids"]))
    batch = {"input_ids": torch.tensor([i + [0] * (n - len(i)) for i in args["ids"]]),
             "attention_mask": torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in args["ids"]])}
else:
    tok = AutoTokenizer.from_pretrained(args["dir"])
    batch = tok(args["prompts"], args["responses"], truncation="only_first", padding=True, return_tensors="pt")
with torch.no_grad():
    out["logits"] = model(**batch).logits[:, 0].float().tolist()
out["class"] = type(model).__name__
out["lengths"] = batch["attention_mask"].sum(1).tolist()
print("RESULT " + json.dumps(out))
"""


def load_without_moerm(folder: Path, prompts: list[str], responses: list[str], trust: bool,
                       tmp_path: Path, ids: list[list[int]] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    args = json.dumps({"dir": str(folder), "prompts": prompts, "responses": responses, "trust": trust, "ids": ids})
    done = subprocess.run([sys.executable, "-c", SCRIPT, args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT " in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    out = json.loads(done.stdout.split("RESULT ")[-1].strip())
    assert out["moerm_importable"] is False
    return out


def long_pairs() -> tuple[list[str], list[str]]:
    """Prompts far past max_length (64 tokens), short responses, plus one short pair."""
    pairs = toy_pairs(3, seed=5)
    prompts = [" ".join([p.prompt] * 12) for p in pairs] + [PAIRS[0][0]]
    return prompts, [p.chosen for p in pairs] + [PAIRS[0][1]]


def test_code_export_fails_loudly_without_trust_remote_code_and_matches_with_it(tiny_bert: str,
                                                                                  tmp_path: Path) -> None:
    run = train_tiny("baseline", tiny_bert, tmp_path / "run")
    info = export_run(run, tmp_path / "hf")
    assert info["format"] == "code" and info["truncation"]["side"] == "left"
    prompts, responses = long_pairs()
    out = load_without_moerm(tmp_path / "hf", prompts, responses, True, tmp_path)
    assert out["stock_load"] != "loaded" and "trust_remote_code=True" in out["stock_load"], out["stock_load"]
    assert out["class"] == "MoermRewardModel"
    assert max(out["lengths"][:3]) == 64  # the long pairs were cut to max_length, the short one was not
    ours = torch.tensor(load_system(run).score(prompts, responses).rewards)
    torch.testing.assert_close(torch.tensor(out["logits"]), ours, atol=1e-5, rtol=0)


def test_native_export_loads_as_the_stock_class_without_moerm(tiny_bert: str, tmp_path: Path) -> None:
    from hubutil import save_hf_rm

    import_hf(save_hf_rm("bert", tmp_path / "hf-rm", tiny_bert), tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "hf")
    assert info["format"] == "native" and not info["trust_remote_code"]
    prompts, responses = long_pairs()
    out = load_without_moerm(tmp_path / "hf", prompts, responses, False, tmp_path)
    assert out["stock_load"] == "loaded" and out["class"] == "BertForSequenceClassification"
    ours = torch.tensor(load_system(tmp_path / "run").score(prompts, responses).rewards)
    torch.testing.assert_close(torch.tensor(out["logits"]), ours, atol=1e-5, rtol=0)


def test_decoder_code_export_refuses_the_stock_class(tiny_llama: str, tmp_path: Path) -> None:
    """The case that was silently wrong (a decoder's stock class has `score` but no bias): now an error."""
    run = train_tiny("baseline", tiny_llama, tmp_path / "run")
    export_run(run, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "moerm_reward" and cfg["moerm_reward"]["base_model_type"] == "llama"
    prompts, responses = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    enc = load_system(run).encoder
    ids = [enc.encode(p, r)["input_ids"] for p, r in PAIRS]
    out = load_without_moerm(tmp_path / "hf", prompts, responses, True, tmp_path, ids=ids)
    assert out["stock_load"] != "loaded" and "trust_remote_code=True" in out["stock_load"], out["stock_load"]
    ours = torch.tensor(load_system(run).score(prompts, responses).rewards)
    torch.testing.assert_close(torch.tensor(out["logits"]), ours, atol=1e-5, rtol=0)
