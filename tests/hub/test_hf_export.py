"""`export`: a moerm RM as a folder `AutoModelForSequenceClassification.from_pretrained` loads, same rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import toy_pairs
from hubutil import PAIRS, hf_logits, make_hf_rms
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from moerm.config import ModelConfig, RunConfig, TrainConfig
from moerm.errors import UserError
from moerm.hub.hf_export import export_run
from moerm.hub.hf_import import import_hf
from moerm.systems.base import FitContext, build_system, load_system


@pytest.fixture(scope="module")
def hf_rms(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str, tiny_llama: str) -> dict[str, str]:
    return make_hf_rms(tmp_path_factory.mktemp("hf-rms"), tiny_bert, tiny_llama)


@pytest.fixture(autouse=True)
def _modules_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """trust_remote_code copies the modeling file into HF's modules cache: keep it inside the test's folder."""
    import transformers.dynamic_module_utils as dm

    monkeypatch.setattr(dm, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def train_tiny(system: str, backbone: str, out: Path, **model: object) -> Path:
    cfg = RunConfig(system=system, model=ModelConfig(backbone=backbone, max_length=64, **model),
                    train=TrainConfig(max_steps=3, batch_size=8, lr=1e-3, save_every=0, seed=0))
    s = build_system(cfg)
    s.fit(toy_pairs(24), None, FitContext(out, progress=False))
    s.save(out / "model")
    return out


def moerm_rewards(run: Path) -> torch.Tensor:
    return torch.tensor(load_system(run).score([p for p, _ in PAIRS], [r for _, r in PAIRS], batch_size=2).rewards)


CASES = [("baseline", "tiny_bert", {}), ("baseline", "tiny_bert", {"pooling": "cls", "head": "mlp", "head_hidden": 8}),
         ("baseline", "tiny_gpt2", {}), ("baseline", "tiny_llama", {}), ("baselora", "tiny_llama", {}),
         ("baselora", "tiny_bert", {})]


@pytest.mark.parametrize("system,backbone,model", CASES)
def test_exported_logits_equal_moerm_score(system: str, backbone: str, model: dict, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    run = train_tiny(system, request.getfixturevalue(backbone), tmp_path / "run", **model)
    info = export_run(run, tmp_path / "hf")
    assert info["format"] == "code" and info["trust_remote_code"]
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors" in files and "modeling_moerm_reward.py" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    enc = load_system(run).encoder
    theirs = hf_logits(str(tmp_path / "hf"), enc, trust_remote_code=True)
    ours = moerm_rewards(run)
    assert float(ours.std()) > 0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    if system == "baselora":  # the adapter is merged into the exported weights, not dropped
        exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
        original = load_file(str(Path(request.getfixturevalue(backbone)) / "model.safetensors"))
        prefix = info["base_prefix"] + "."
        assert max(float((exported[prefix + k] - v).abs().max()) for k, v in original.items()
                   if prefix + k in exported) > 1e-6


def test_decoder_export_reads_as_openrlhf_does(tiny_llama: str, tmp_path: Path) -> None:
    """OpenRLHF's reward model: AutoModel under the base prefix, a bias-free `score` on the last attended token,
    and (reward - config.mean) / config.std with --normalize_reward. Written here from its documented behaviour."""
    run = train_tiny("baseline", tiny_llama, tmp_path / "run")
    info = export_run(run, tmp_path / "hf")
    assert info["openrlhf"] and info["base_prefix"] == "model"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    w = weights["score.weight"]  # (1, H)
    assert w.shape[0] == 1 and all(k.startswith(("model.", "score.")) for k in weights)
    # OpenRLHF's loader: the config (trust_remote_code), the stock base class looked up from its class, then
    # that class's weights under the base prefix
    config = AutoConfig.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    base_class = AutoModel._model_mapping[type(config)]
    assert base_class.__name__ == "LlamaModel"
    base = base_class.from_pretrained(str(tmp_path / "hf"), config=config).eval()
    enc = load_system(run).encoder
    batch = enc.pad([enc.encode(p, r) for p, r in PAIRS])
    mask = batch["attention_mask"]
    with torch.no_grad():
        hidden = base(input_ids=batch["input_ids"], attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    last = mask.size(1) - 1 - mask.fliplr().argmax(1)
    reward = (hidden[torch.arange(len(PAIRS)), last] @ w.T).squeeze(-1)
    torch.testing.assert_close((reward - cfg["mean"]) / cfg["std"], moerm_rewards(run), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta", "deberta-v2", "llama"])
def test_import_then_export_gives_the_original_logits(kind: str, hf_rms: dict[str, str], tmp_path: Path) -> None:
    import_hf(hf_rms[kind], tmp_path / "run")
    info = export_run(tmp_path / "run", tmp_path / "hf")
    assert info["format"] == "native" and not info["trust_remote_code"]
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == json.loads((Path(hf_rms[kind]) / "config.json").read_text())["architectures"]
    enc = load_system(tmp_path / "run").encoder
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), enc), hf_logits(hf_rms[kind], enc), atol=1e-5, rtol=0)


def test_routed_and_other_systems_are_refused(tiny_bert: str, tmp_path: Path) -> None:
    run = train_tiny("more", tiny_bert, tmp_path / "more", tuning="frozen")
    with pytest.raises(UserError, match="no Hugging Face equivalent"):
        export_run(run, tmp_path / "out")
    base = train_tiny("baseline", tiny_bert, tmp_path / "base")
    with pytest.raises(UserError, match="--domain picks one domain RM of a rodos system"):
        export_run(base, tmp_path / "out", domain="x")
    assert not (tmp_path / "out").exists()


def test_a_calibrated_rm_exports_its_calibrated_reward(tiny_bert: str, tmp_path: Path) -> None:
    """options.calibration=zscore: the exported logit is the reward `moerm score` gives (the map folded into the
    head), and export.json records the map."""
    cfg = RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=64),
                    train=TrainConfig(max_steps=3, batch_size=8, lr=1e-3, save_every=0, seed=0),
                    options={"calibration": "zscore"})
    s = build_system(cfg)
    s.fit(toy_pairs(40), None, FitContext(tmp_path / "run", progress=False))
    s.save(tmp_path / "run" / "model")
    info = export_run(tmp_path / "run", tmp_path / "hf")
    scale = load_system(tmp_path / "run").calibration.scales["rm"]
    assert info["calibration"] == {"mean": scale.mean, "std": scale.std, "applied": "folded into the head"}
    assert scale.std != 1.0
    theirs = hf_logits(str(tmp_path / "hf"), load_system(tmp_path / "run").encoder, trust_remote_code=True)
    torch.testing.assert_close(theirs, moerm_rewards(tmp_path / "run"), atol=1e-4, rtol=0)
