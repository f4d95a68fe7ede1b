"""Splitting OpenRLHF queries into the plain prompt and response, as OpenRLHF's own clients build them: Qwen2.5 (a
default system prompt), Llama-3 (with and without a system block) and a template-free GPT-2-style tokenizer, current
and older (padded batch) clients, with and without `prompts`; and every way a query can fail to split.

The tokenizers are built offline: byte-level like the real ones (decode(encode(text)) == text), with the real
Qwen2.5 and Llama-3 chat templates. Helpers here are also used by test_openrlhf_app.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moerm.errors import UserError
from moerm.serve.config import ServeConfig, ServeConfigError
from moerm.serve.openrlhf import QuerySplitter, SplitError, format_from_tokenizer, resolve_format

# Qwen2.5-*-Instruct's tokenizer_config.json chat_template (a default system prompt when none is given).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Meta-Llama-3-8B-Instruct's chat_template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def byte_tokenizer(eos: str, pad: str | None = None, bos: str | None = None, extra: tuple[str, ...] = (),
                   chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte; decode(encode(text)) == text, as GPT-2's)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
                                   additional_special_tokens=list(extra))
    if fast.pad_token is None:
        fast.pad_token = fast.eos_token  # what OpenRLHF's get_tokenizer does for a tokenizer without a pad token
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer("<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>",), chat_template=QWEN25_TEMPLATE)


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer("<|eot_id|>", bos="<|begin_of_text|>",
                          extra=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
                          chat_template=LLAMA3_TEMPLATE)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer("<|endoftext|>")


TOKENIZERS = {"qwen2.5": qwen_tokenizer, "llama3": llama3_tokenizer, "gpt2": gpt2_tokenizer}


def save_tokenizer(kind: str, root: Path) -> str:
    path = root / f"tok-{kind}"
    TOKENIZERS[kind]().save_pretrained(path)
    return str(path)


def openrlhf_prompt(tok: PreTrainedTokenizerFast, prompt: str | list[dict[str, str]]) -> str:
    """The prompt text OpenRLHF's PromptDataset gives the policy (--apply_chat_template when there is a template)."""
    if not tok.chat_template:
        assert isinstance(prompt, str)
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def response_ids(tok: PreTrainedTokenizerFast, response: str) -> list[int]:
    """The policy's generated tokens: the response (after a space for a template-free prompt, as a plain LM
    continues text) and the EOS it stops on."""
    return _ids(tok, response if tok.chat_template else " " + response) + [tok.eos_token_id]


def new_client_request(tok: PreTrainedTokenizerFast, prompts: list[Any], responses: list[str]) -> dict[str, Any]:
    """OpenRLHF's current request: query = decode(prompt ids + response ids) per sample, with prompts and labels."""
    texts = [openrlhf_prompt(tok, p) for p in prompts]
    queries = [tok.decode(_ids(tok, t) + response_ids(tok, r), skip_special_tokens=False)
               for t, r in zip(texts, responses)]
    return {"query": queries, "prompts": texts, "labels": [""] * len(texts)}


def old_client_request(tok: PreTrainedTokenizerFast, prompts: list[Any], responses: list[str],
                       send_prompts: bool = True) -> dict[str, Any]:
    """OpenRLHF's older batched client: generate() output rows are the prompt left-padded with the pad token, then
    the response padded on the right after its EOS; `batch_decode(..., skip_special_tokens=False)` keeps it all."""
    texts = [openrlhf_prompt(tok, p) for p in prompts]
    p_ids = [_ids(tok, t) for t in texts]
    r_ids = [response_ids(tok, r) for r in responses]
    pw, rw = max(map(len, p_ids)), max(map(len, r_ids))
    pad = tok.pad_token_id
    rows = [[pad] * (pw - len(p)) + p + r + [pad] * (rw - len(r)) for p, r in zip(p_ids, r_ids)]
    request: dict[str, Any] = {"query": tok.batch_decode(rows, skip_special_tokens=False)}
    if send_prompts:
        request["prompts"] = texts
    return request


# -- the cases: what the user asked (messages), what the policy answered, and the plain prompt moerm score reads
CONVERSATIONS: list[tuple[Any, str, str]] = [
    ("What is two plus two?", "It is four.", "What is two plus two?"),
    ([{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "Name a colour."}], "Blue.",
     "Name a colour."),
    ([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], "Why did the chicken cross the road?",
     "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."),
]
PLAIN_CONVERSATIONS: list[tuple[Any, str, str]] = [
    ("Tell me a joke.", "Why did the chicken cross the road?", "Tell me a joke."),
    ("What is two plus two?", "Four.", "What is two plus two?"),
]
PRESET_OF = {"qwen2.5": "chatml", "llama3": "llama3", "gpt2": "plain"}


def cases(kind: str) -> tuple[list[Any], list[str], list[str]]:
    """(messages or prompt, response, the plain prompt) columns of the cases a tokenizer of `kind` can render."""
    rows = CONVERSATIONS if kind != "gpt2" else PLAIN_CONVERSATIONS
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def splitter(kind: str, how: str, tmp_path: Path) -> QuerySplitter:
    """The splitter of the policy's format: its preset, or derived from its saved tokenizer (tokenizer:PATH)."""
    spec = PRESET_OF[kind] if how == "preset" else f"tokenizer:{save_tokenizer(kind, tmp_path)}"
    return QuerySplitter.from_spec(spec)


@pytest.mark.parametrize("how", ["preset", "tokenizer"])
@pytest.mark.parametrize("kind", ["qwen2.5", "llama3", "gpt2"])
def test_openrlhf_queries_split_into_the_plain_prompt_and_response(kind: str, how: str, tmp_path: Path) -> None:
    tok = TOKENIZERS[kind]()
    prompts, responses, plain = cases(kind)
    split = splitter(kind, how, tmp_path)
    requests = {"current": new_client_request(tok, prompts, responses),
                "old, padded": old_client_request(tok, prompts, responses)}
    if kind != "gpt2":  # the oldest clients send only `query`; a chat format splits it alone
        requests["old, query only"] = old_client_request(tok, prompts, responses, send_prompts=False)
    for name, request in requests.items():
        assert split.split_all(request["query"], request.get("prompts")) == (plain, responses), name
    # the queries really carry what must go: padding both sides, the EOS, and Qwen's default system prompt
    padded = requests["old, padded"]["query"]
    assert any(q.startswith(tok.pad_token) for q in padded) and any(q.endswith(tok.pad_token) for q in padded)
    if kind == "qwen2.5":
        assert QWEN_DEFAULT_SYSTEM in requests["current"]["query"][0]
    if kind == "llama3":
        assert all(q.startswith("<|begin_of_text|>") and q.endswith("<|eot_id|>")
                   for q in requests["current"]["query"])


def test_a_format_derived_from_a_tokenizer_reads_its_markup() -> None:
    qwen = format_from_tokenizer(qwen_tokenizer(), "qwen")
    assert qwen.user_open == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n",)
    assert (qwen.reply, qwen.reply_close) == ("<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n")
    assert (qwen.system_open, qwen.system_close) == ("<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n")
    assert "<|im_end|>" in qwen.strip_tokens and "<|endoftext|>" in qwen.strip_tokens  # its EOS and pad
    llama = format_from_tokenizer(llama3_tokenizer(), "llama")
    assert llama.turn == "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    assert llama.system_open == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    gpt2 = format_from_tokenizer(gpt2_tokenizer(), "gpt2")
    assert gpt2.plain and gpt2.reply == ""


def test_a_wrong_format_is_an_error_never_a_reward(tmp_path: Path) -> None:
    qwen, llama = qwen_tokenizer(), llama3_tokenizer()
    prompts, responses, _ = cases("qwen2.5")
    q_req, l_req = new_client_request(qwen, prompts, responses), new_client_request(llama, prompts, responses)
    chatml, llama3, plain = (QuerySplitter.from_spec(s) for s in ("chatml", "llama3", "plain"))
    # with prompts: the prompt itself must parse in the format
    with pytest.raises(SplitError, match="prompts\\[0\\] does not start the way llama3 prompts start") as e:
        llama3.split_all(q_req["query"], q_req["prompts"])
    assert (e.value.field, e.value.index) == ("prompts", 0)
    with pytest.raises(SplitError, match="does not start the way chatml prompts start"):
        chatml.split_all(l_req["query"], l_req["prompts"])
    with pytest.raises(SplitError, match="holds chat markup '<\\|im_start\\|>'.*template is plain"):
        plain.split_all(q_req["query"], q_req["prompts"])
    # without prompts: the query must open like the format
    with pytest.raises(SplitError, match="does not start the way chatml conversations start") as e:
        chatml.split_all(l_req["query"])
    assert (e.value.field, e.value.index) == ("query", 0)
    with pytest.raises(SplitError, match="cannot be split; send `prompts`"):
        plain.split_all(["Tell me a joke. Why did the chicken cross the road?"])


def test_a_prompt_that_does_not_start_its_query_is_an_error() -> None:
    tok = qwen_tokenizer()
    prompts, responses, _ = cases("qwen2.5")
    req = new_client_request(tok, prompts, responses)
    swapped = [req["prompts"][0], req["prompts"][2], req["prompts"][1]]
    with pytest.raises(SplitError, match="it does not start with prompts\\[1\\].*differ at character") as e:
        QuerySplitter.from_spec("chatml").split_all(req["query"], swapped)
    assert (e.value.field, e.value.index) == ("query", 1)
    with pytest.raises(ValueError, match="1 prompts for 3 queries"):
        QuerySplitter.from_spec("chatml").split_all(req["query"], req["prompts"][:1])


def test_a_truncated_response_and_a_prompt_ending_in_an_assistant_turn() -> None:
    chatml = QuerySplitter.from_spec("chatml")
    head = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.split(head + "partial answer") == ("Q", "partial answer")  # stopped at max length: no EOS
    assert chatml.split(head + "done<|im_end|>\n") == ("Q", "done")
    assert chatml.split(head, head) == ("Q", "")  # an empty response
    with pytest.raises(SplitError, match="ends inside an assistant turn"):
        chatml.split(head + "A<|im_end|>\n<|im_start|>assistant\nB", head + "A<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("spec, query, expected", [
    ("hh", "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, by day.", ("Is the sky blue?", "Yes, by day.")),
    ("hh", "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Sky colour?\n\nAssistant: Blue",
     ("Human: Hi\n\nAssistant: Hello\n\nHuman: Sky colour?", "Blue")),
    ("<<{prompt}>> ANSWER: {response} <END>", "<s><<Name a colour>> ANSWER: red <END></s>", ("Name a colour", "red")),
])
def test_hh_and_custom_templates(spec: str, query: str, expected: tuple[str, str]) -> None:
    assert QuerySplitter.from_spec(ServeConfig(query_template=spec).query_template).split(query) == expected
    with pytest.raises(SplitError, match="does not start the way"):
        QuerySplitter.from_spec(spec).split("Name a colour ANSWER: red")


@pytest.mark.parametrize("template, message", [
    ("{response} then {prompt}", "contain '{prompt}' then '{response}'"),
    ("{prompt}{response}", "needs a separator"),
    ("no placeholders", "chatml, llama3, hh, plain, auto, tokenizer:PATH"),
    ("tokenizer:", "name the policy's tokenizer"),
])
def test_bad_templates_fail_at_start_up(template: str, message: str) -> None:
    with pytest.raises(ServeConfigError, match=re.escape(message)):
        ServeConfig(query_template=template)


def test_auto_needs_a_backbone_with_a_chat_template(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has none to read"):
        resolve_format("auto", backbone=None)
    with pytest.raises(UserError, match="has no chat template.*plain if the policy writes plain text"):
        resolve_format("auto", backbone=save_tokenizer("gpt2", tmp_path))
    fmt = resolve_format("auto", ("<extra>",), backbone=save_tokenizer("llama3", tmp_path))
    assert fmt.name.startswith("auto (") and fmt.reply.endswith("assistant<|end_header_id|>\n\n")
    assert "<extra>" in fmt.strip_tokens and "<|eot_id|>" in fmt.strip_tokens
