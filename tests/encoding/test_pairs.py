"""Decoder encoding: chat templates (ChatML/Qwen-style and Llama-3-style), their truncation, and plain BOS/EOS."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moerm.encoding import BackboneError, PairEncoder, hh_messages, make_encoder

CORPUS = [
    "system user assistant You are a helpful assistant.",
    "tell me why the sky is blue please, and what light does",
    "the answer is probably that light scatters unbelievably well",
    "hello there how are you today? I am fine thanks",
] * 4

QWEN = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Meta's Llama-3 template, verbatim: BOS from the template, content trimmed, <|eot_id|> after each turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A strict template (as Llama-2/Mistral's): the conversation must open with the user.
STRICT = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    "{% endif %}{% for message in messages %}{{ '[' + message['role'] + '] ' + message['content'] + eos_token }}"
    "{% endfor %}"
)


def _bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def qwen() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN)


def _llama(chat_template: str | None) -> PreTrainedTokenizerFast:
    raw = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = raw.token_to_id("<|begin_of_text|>")
    # like Llama 3's tokenizer.json: the tokenizer itself adds BOS to plain text
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)],
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B:1")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", chat_template=chat_template)


@pytest.fixture(scope="module")
def llama() -> PreTrainedTokenizerFast:
    return _llama(LLAMA3)


HH = "Human: hello there\n\nAssistant: I am fine thanks\n\nHuman: tell me why the sky is blue please"
HH_MESSAGES = [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "I am fine thanks"},
    {"role": "user", "content": "tell me why the sky is blue please"},
]
ANSWER = "the answer is probably that light scatters"


def _ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _template_ids(tok: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])


def test_hh_prompts_become_alternating_turns():
    assert hh_messages(HH) == HH_MESSAGES
    assert hh_messages(HH + "\n\nAssistant:") == HH_MESSAGES  # the trailing marker is the response's own turn
    assert hh_messages("Human: a\n\nHuman: b") == [{"role": "user", "content": "a\n\nb"}]
    assert hh_messages("what is light?") == [{"role": "user", "content": "what is light?"}]
    assert hh_messages("") == []


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_untruncated_pairs_equal_apply_chat_template(name, request):
    tok = request.getfixturevalue(name)
    enc = PairEncoder(tok, max_length=512, decoder=True)
    for prompt, messages in [("what does light do?", [{"role": "user", "content": "what does light do?"}]),
                             (HH, HH_MESSAGES)]:
        out = enc.encode(prompt, ANSWER)
        expected = _template_ids(tok, [*messages, {"role": "assistant", "content": ANSWER}])
        assert out["input_ids"] == expected and out["attention_mask"] == [1] * len(expected)
    first, last = out["input_ids"][0], out["input_ids"][-2:]
    if name == "qwen":
        assert tok.decode(out["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
        assert last == [tok.convert_tokens_to_ids("<|im_end|>"), *tok("\n", add_special_tokens=False)["input_ids"]]
    else:
        assert first == tok.bos_token_id and out["input_ids"].count(tok.bos_token_id) == 1  # no double BOS
        assert out["input_ids"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_empty_prompt_is_a_lone_assistant_turn_or_an_empty_user_turn(qwen):
    lone = PairEncoder(qwen, 512, decoder=True).encode("", ANSWER)
    assert lone["input_ids"] == _template_ids(qwen, [{"role": "assistant", "content": ANSWER}])
    strict = PreTrainedTokenizerFast(tokenizer_object=qwen.backend_tokenizer, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", chat_template=STRICT)
    with pytest.raises(Exception, match="alternate"):
        strict.apply_chat_template([{"role": "assistant", "content": ANSWER}])
    out = PairEncoder(strict, 512, decoder=True).encode("", ANSWER)
    assert out["input_ids"] == _template_ids(strict, [{"role": "user", "content": ""},
                                                      {"role": "assistant", "content": ANSWER}])


def test_truncation_drops_early_turns_then_trims_the_oldest_user_content(qwen):
    tail = [*_ids(qwen, "<|im_end|>\n<|im_start|>assistant\n"), *_ids(qwen, ANSWER), *_ids(qwen, "<|im_end|>\n")]
    last_user = _template_ids(qwen, [HH_MESSAGES[-1], {"role": "assistant", "content": ANSWER}])
    full = _template_ids(qwen, [*HH_MESSAGES, {"role": "assistant", "content": ANSWER}])
    limit = len(last_user) - 3  # not even the last user turn fits whole: its 3 oldest tokens go
    out = PairEncoder(qwen, limit, decoder=True).encode(HH, ANSWER)["input_ids"]
    assert len(out) == limit < len(full)
    text = qwen.decode(out)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n") and out[-len(tail):] == tail
    assert "hello there" not in text and "I am fine" not in text  # the early turns went whole
    user_ids = _ids(qwen, HH_MESSAGES[-1]["content"])
    assert out[len(out) - len(tail) - (len(user_ids) - 3): len(out) - len(tail)] == user_ids[3:]  # its newest tokens

    # room for the last two turns whole and part of the first: the first user content loses tokens from its left
    first_user = _ids(qwen, "hello there")
    out = PairEncoder(qwen, len(full) - 1, decoder=True).encode(HH, ANSWER)["input_ids"]
    assert len(out) == len(full) - 1
    assert qwen.decode(out).count("<|im_start|>user") == 2 and "I am fine thanks" in qwen.decode(out)
    assert out == full[:full.index(first_user[0])] + full[full.index(first_user[0]) + 1:]


def test_a_long_response_keeps_its_beginning_and_the_template_tokens(llama):
    long_answer = " ".join([ANSWER] * 40)
    limit = 48
    out = PairEncoder(llama, limit, decoder=True).encode("tell me why", long_answer)["input_ids"]
    assert len(out) == limit
    text = llama.decode(out)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>")  # prompt gone
    assert text.endswith("<|eot_id|>") and "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER in text
    head = [*_ids(llama, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"),
            *_ids(llama, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")]
    body = out[len(head):-1]
    assert out[: len(head)] == head and body == _ids(llama, long_answer)[: len(body)]
    with pytest.raises(BackboneError, match="shorter than the chat template"):
        PairEncoder(llama, 8, decoder=True).encode("tell me why", long_answer)


def test_plain_decoders_get_bos_as_their_tokenizer_adds_it_and_eos_at_the_end(tiny_gpt2):
    tok = _llama(None)
    out = PairEncoder(tok, 64, decoder=True).encode("tell me why", "light scatters")["input_ids"]
    assert out == [tok.bos_token_id, *_ids(tok, "tell me why"), *_ids(tok, "\n\n"), *_ids(tok, "light scatters"),
                   tok.eos_token_id]
    long = "light scatters unbelievably well"
    assert len(_ids(tok, long)) > 4
    cut = PairEncoder(tok, 6, decoder=True).encode("tell me why", long)["input_ids"]
    assert cut == [tok.bos_token_id, *_ids(tok, long)[:4], tok.eos_token_id]  # no room left for the prompt
    gpt2 = make_encoder(tiny_gpt2, max_length=32)  # GPT-2's tokenizer adds no BOS
    g = gpt2.encode("tell me why", "good answer")["input_ids"]
    assert g == [*_ids(gpt2.tokenizer, "tell me why"), *_ids(gpt2.tokenizer, "good answer"), gpt2.tokenizer.eos_token_id]


def test_remembered_encodings_are_the_same_ids_without_tokenizing_again(tiny_bert):
    enc = make_encoder(tiny_bert, 64)
    fresh = [enc.encode(p, r) for p, r in [("a question", "an answer"), ("why", "because"), ("q", "r")]]
    calls = []
    real = enc.tokenizer.__call__

    class Counting(type(enc.tokenizer)):  # counts the tokenizer's calls without changing what it returns
        def __call__(self, *a, **k):
            calls.append(a[0] if a else None)
            return real(*a, **k)

    enc.tokenizer.__class__ = Counting
    enc.remember(2)
    assert enc.encode("a question", "an answer") == fresh[0] and len(calls) > 0
    n = len(calls)
    assert enc.encode("a question", "an answer") == fresh[0] and len(calls) == n  # kept: no tokenizer call
    enc.encode("why", "because"), enc.encode("q", "r")  # two more: the first pair is the least recent, dropped
    n = len(calls)
    assert enc.encode("a question", "an answer") == fresh[0] and len(calls) > n
    enc.remember(0)
    n = len(calls)
    assert enc.encode("q", "r") == fresh[2] and len(calls) > n  # off: every call tokenizes
