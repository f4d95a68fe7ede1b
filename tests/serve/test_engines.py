"""The engines' reward protocols with their clients' request shapes: vLLM's `/classify` and `/pooling`, SGLang's
`/v1/embeddings`, as verl's reward loop and vLLM reward-model clients send them. Every served score is the reward
`system.score` gives the plain prompt and response; an input that does not parse is a 422 naming it, never a score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from moerm.serve import BackgroundServer
from moerm.serve.engines import sigmoid
from moerm.systems import load_system
from test_openrlhf import TOKENIZERS, cases, save_tokenizer
from test_openrlhf_app import Recording, qwen_run, serving  # noqa: F401  # qwen_run: a module fixture

MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B"  # what a verl config names; moerm answers whatever it is called


def verl_rm_prompt(tok: Any, prompt: Any, response: str) -> str:
    """verl's RewardLoopWorker._preprocess_reward_inputs: the chat plus the assistant's reply, templated with the
    reward model's tokenizer without a generation prompt, its BOS removed."""
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = str(tok.apply_chat_template([*chat, {"role": "assistant", "content": response}],
                                       add_generation_prompt=False, tokenize=False))
    if tok.bos_token is not None and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    return text


def verl_payload(text: str) -> dict[str, Any]:
    """verl's /classify payload for a vLLM reward model (one input per request)."""
    return {"model": MODEL, "input": text, "activation": False}


def post(srv: BackgroundServer, path: str, body: dict[str, Any]) -> httpx.Response:
    # ASCII escapes: a lone surrogate travels as \ud800, as a client's json.dumps sends it
    return httpx.post(srv.url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"Content-Type": "application/json"})


def want(prompt: str, response: str) -> float:
    return len(prompt) + len(response) / 1000


@pytest.mark.parametrize("kind", ["qwen2.5", "llama3"])
def test_verl_classify_requests_get_the_reward_of_the_plain_pair(kind: str, tmp_path: Path) -> None:
    tok = TOKENIZERS[kind]()
    prompts, responses, plain = cases(kind)
    fake = Recording()
    template = f"tokenizer:{save_tokenizer(kind, tmp_path)}"
    with serving(fake, template) as srv:
        answers = [post(srv, "/classify", verl_payload(verl_rm_prompt(tok, p, r))) for p, r in zip(prompts, responses)]
        # vLLM's default: the activation (sigmoid, one label) on; a list of inputs gets one score each, in order
        texts = [verl_rm_prompt(tok, p, r) for p, r in zip(prompts, responses)]
        default = post(srv, "/classify", {"model": MODEL, "input": texts})
        use_activation = post(srv, "/classify", {"input": texts, "use_activation": False})
        # token ids, as vLLM accepts them: decoded with the query format's tokenizer
        ids = post(srv, "/classify", {"input": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                                      "activation": False})
        # a chat request: the messages themselves
        chat = post(srv, "/classify", {"messages": [{"role": "user", "content": plain[0]},
                                                    {"role": "assistant", "content": responses[0]}],
                                       "use_activation": False})
    expected = [want(p, r) for p, r in zip(plain, responses)]
    for r, w in zip(answers, expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("classify-")
        assert body["data"][-1]["probs"][-1] == w  # what verl reads
        assert body["data"] == [{"index": 0, "label": "reward", "probs": [w], "num_classes": 1}]
        assert set(body["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    assert [d["probs"] for d in default.json()["data"]] == [[sigmoid(w)] for w in expected]
    assert [d["index"] for d in default.json()["data"]] == list(range(len(expected)))
    assert [d["probs"][0] for d in use_activation.json()["data"]] == expected
    assert ids.status_code == 200, ids.text
    assert [d["probs"][0] for d in ids.json()["data"]] == expected
    assert chat.status_code == 200, chat.text
    assert chat.json()["data"][0]["probs"] == [expected[0]]
    assert fake.prompts == plain * 4 + plain[:1] and fake.responses == responses * 4 + responses[:1]


def test_pooling_and_sglang_embeddings_give_the_raw_reward(tmp_path: Path) -> None:
    tok = TOKENIZERS["qwen2.5"]()
    prompts, responses, plain = cases("qwen2.5")
    texts = [verl_rm_prompt(tok, p, r) for p, r in zip(prompts, responses)]
    expected = [want(p, r) for p, r in zip(plain, responses)]
    with serving(Recording(), "chatml") as srv:
        pooling = post(srv, "/pooling", {"model": MODEL, "input": texts})
        pooled_sigmoid = post(srv, "/pooling", {"model": MODEL, "input": texts, "use_activation": True})
        sglang = post(srv, "/v1/embeddings", {"model": MODEL, "input": texts[1]})  # verl's SGLang payload
    assert pooling.status_code == 200, pooling.text
    assert pooling.json()["data"] == [{"index": i, "object": "pooling", "data": [w]} for i, w in enumerate(expected)]
    assert [d["data"][0] for d in pooled_sigmoid.json()["data"]] == [sigmoid(w) for w in expected]
    assert sglang.status_code == 200, sglang.text
    assert sglang.json()["data"][-1]["embedding"][-1] == expected[1]


def test_inputs_that_do_not_parse_get_422_naming_them_and_nothing_is_scored(tmp_path: Path) -> None:
    qwen, llama = TOKENIZERS["qwen2.5"](), TOKENIZERS["llama3"]()
    prompts, responses, _ = cases("qwen2.5")
    good = verl_rm_prompt(qwen, prompts[0], responses[0])
    fake = Recording()
    with serving(fake, "chatml") as srv:
        wrong_format = post(srv, "/classify", {"input": [good, verl_rm_prompt(llama, prompts[0], responses[0])]})
        ids_without_tokenizer = post(srv, "/classify", {"input": [1, 2, 3]})
        both = post(srv, "/classify", {"input": good, "messages": [{"role": "assistant", "content": "x"}]})
        no_reply = post(srv, "/classify", {"messages": [{"role": "user", "content": "q"}]})
        truncated = post(srv, "/classify", {"input": good, "truncate_prompt_tokens": 16})
        surrogate = post(srv, "/pooling", {"input": [good, good.replace("two", "\ud800")]})
        wrong_type = post(srv, "/classify", {"input": 5})
        too_many = post(srv, "/classify", {"input": [good] * 300})
        empty = post(srv, "/classify", {"input": []})
    assert wrong_format.status_code == 422 and wrong_format.json()["errors"][0]["field"] == "input.1"
    assert "does not start the way chatml conversations start" in wrong_format.json()["detail"]
    assert ids_without_tokenizer.status_code == 422 and "tokenizer" in ids_without_tokenizer.json()["detail"]
    assert ids_without_tokenizer.json()["errors"][0]["field"] == "input"
    assert both.status_code == 422 and "one of the two" in both.json()["detail"]
    assert no_reply.status_code == 422 and no_reply.json()["errors"][0]["field"] == "messages"
    assert truncated.status_code == 422 and truncated.json()["errors"][0]["field"] == "truncate_prompt_tokens"
    assert surrogate.status_code == 422 and surrogate.json()["errors"][0]["field"] == "input.1"
    assert wrong_type.status_code == 422
    assert too_many.status_code == 413 and "300 inputs" in too_many.json()["detail"]
    assert empty.status_code == 422 and "empty list" in empty.json()["detail"]
    assert fake.prompts == []


def test_served_classify_scores_equal_offline_score(qwen_run: Path) -> None:  # noqa: F811
    system = load_system(qwen_run)
    tok = TOKENIZERS["qwen2.5"]()
    prompts, responses, plain = cases("qwen2.5")
    offline = torch.tensor(system.score(plain, responses).rewards)
    texts = [verl_rm_prompt(tok, p, r) for p, r in zip(prompts, responses)]
    with serving(str(qwen_run), "auto") as srv:
        single = [post(srv, "/classify", verl_payload(t)) for t in texts]
        ids = post(srv, "/classify", {"input": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                                      "activation": False})
        info = httpx.get(srv.url + "/v1/info").json()
    for r in single:
        assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor([r.json()["data"][-1]["probs"][-1] for r in single]), offline,
                               atol=1e-5, rtol=0)
    assert ids.status_code == 200, ids.text
    torch.testing.assert_close(torch.tensor([d["probs"][0] for d in ids.json()["data"]]), offline, atol=1e-5, rtol=0)
    # usage counts the tokens the reward model read (its encoder's, per pair)
    enc = system.encoder
    assert single[0].json()["usage"]["prompt_tokens"] == len(enc.encode(plain[0], responses[0])["input_ids"])
    assert info["model"] == qwen_run.name
    assert math.isfinite(offline.sum().item())
