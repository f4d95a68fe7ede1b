"""`import-hf`: a Hugging Face sequence-classification RM becomes a baseline run whose rewards are its logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hubutil import PAIRS, hf_logits, make_hf_rms, save_hf_rm

from moerm.errors import UserError
from moerm.hub.hf_import import backbone_head_warning, import_hf
from moerm.systems.base import load_system


@pytest.fixture(scope="module")
def hf_rms(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str, tiny_llama: str) -> dict[str, str]:
    return make_hf_rms(tmp_path_factory.mktemp("hf-rms"), tiny_bert, tiny_llama)


@pytest.mark.parametrize("kind", ["bert", "deberta-v2", "roberta", "llama", "qwen2"])
def test_imported_rewards_are_the_hf_logits(kind: str, hf_rms: dict[str, str], tmp_path: Path) -> None:
    summary = import_hf(hf_rms[kind], tmp_path / "run")
    system = load_system(tmp_path / "run")
    assert system.name == "baseline" and system.config.model.tuning == "full" and system.config.model.head == "hf"
    assert system.config.model.pooling == ("last" if kind in ("llama", "qwen2") else "cls") == summary["pooling"]
    ours = torch.tensor(system.score([p for p, _ in PAIRS], [r for _, r in PAIRS], batch_size=2).rewards)
    theirs = hf_logits(hf_rms[kind], system.encoder)
    assert float(theirs.std()) > 0  # the pairs are told apart, so a wrong pooling position would show
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["command.txt", "config.yaml", "import.json", "model"]


def test_trl_reward_function_on_an_imported_run(hf_rms: dict[str, str], tmp_path: Path) -> None:
    from moerm.integrations.trl import reward_function

    import_hf(hf_rms["llama"], tmp_path / "run")
    fn = reward_function(tmp_path / "run")
    system = load_system(tmp_path / "run")
    got = torch.tensor(fn(prompts=[p for p, _ in PAIRS], completions=[r for _, r in PAIRS]))
    torch.testing.assert_close(got, hf_logits(hf_rms["llama"], system.encoder), atol=1e-5, rtol=0)


def test_pad_equal_to_the_last_token_is_refused(tiny_gpt2: str, tmp_path: Path) -> None:
    # GPT-2 style: pad == eos, and moerm ends a plain decoder input with EOS; HF's class would skip that token
    path = save_hf_rm("gpt2", tmp_path / "gpt2-rm", tiny_gpt2)
    with pytest.raises(UserError, match="pad_token_id 1"):
        import_hf(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gpt2_with_a_distinct_pad_token_imports(tiny_gpt2: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.pad_token = "<unk>"  # id 0: never the token an input ends with
    tok.save_pretrained(tmp_path / "tok")
    path = Path(save_hf_rm("gpt2", tmp_path / "gpt2-rm", str(tmp_path / "tok")))
    assert json.loads((path / "config.json").read_text())["pad_token_id"] == 0
    import_hf(path, tmp_path / "run")
    system = load_system(tmp_path / "run")
    ours = torch.tensor(system.score([p for p, _ in PAIRS], [r for _, r in PAIRS]).rewards)
    torch.testing.assert_close(ours, hf_logits(str(path), system.encoder), atol=1e-5, rtol=0)


def test_bad_inputs_are_clear_errors(hf_rms: dict[str, str], tiny_bert: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        import_hf(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(UserError, match="names no \\*ForSequenceClassification"):
        import_hf(tiny_bert, tmp_path / "b")  # a bare BertModel
    two = save_hf_rm("bert", tmp_path / "two", tiny_bert)
    cfg = json.loads((Path(two) / "config.json").read_text())
    cfg["id2label"] = {"0": "a", "1": "b"}
    (Path(two) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="num_labels is 2"):
        import_hf(two, tmp_path / "c")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((Path(hf_rms["bert"]) / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="pickle"):
        import_hf(pickled, tmp_path / "d")
    other = tmp_path / "distil"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "distilbert", "architectures":
                                                   ["DistilBertForSequenceClassification"]}))
    with pytest.raises(UserError, match="model_type 'distilbert'"):
        import_hf(other, tmp_path / "e")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        import_hf(hf_rms["bert"], tmp_path / "full")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind


def test_backbone_head_warning(hf_rms: dict[str, str], tiny_bert: str) -> None:
    msg = backbone_head_warning(hf_rms["llama"])
    assert msg is not None and "LlamaForSequenceClassification" in msg and "moerm import-hf" in msg
    assert backbone_head_warning(tiny_bert) is None and backbone_head_warning("minilm") is None
