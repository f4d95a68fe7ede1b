"""Splitting OpenRLHF queries into prompt and response: with `prompts`, with templates, padding, and failures."""

from __future__ import annotations

import pytest

from moerm.serve.config import DEFAULT_STRIP_TOKENS, QUERY_TEMPLATES, ServeConfig, ServeConfigError
from moerm.serve.openrlhf import QuerySplitter, SplitError

CHATML = QuerySplitter(QUERY_TEMPLATES["chatml"], DEFAULT_STRIP_TOKENS)


def chatml(prompt: str, response: str | None = None) -> str:
    head = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return head if response is None else head + response + "<|im_end|>"


def test_prompts_given_split_off_the_prompt_and_strip_padding_and_markup() -> None:
    query = "<|endoftext|><|endoftext|>" + chatml("What is 2+2?", "It is 4.") + "<|endoftext|>"
    assert CHATML.split(query, chatml("What is 2+2?")) == ("What is 2+2?", "It is 4.")
    # a plain prompt (no chat template applied by the policy's dataset) works the same way
    plain = QuerySplitter("{prompt}\n{response}", DEFAULT_STRIP_TOKENS)
    assert plain.split("<s>Tell me a joke. Why did the chicken...</s>", "Tell me a joke.") == \
        ("Tell me a joke.", " Why did the chicken...")


def test_template_splits_at_the_last_assistant_turn() -> None:
    multi = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
             "Hello!<|im_end|>\n<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")
    prompt, response = CHATML.split(multi + "<|endoftext|>")
    assert response == "4"
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("And 2+2?")
    # a truncated response (no closing <|im_end|>) still splits
    assert CHATML.split(chatml("Q") + "partial answer") == ("Q", "partial answer")


def test_prompt_that_does_not_prefix_the_query_falls_back_to_the_template() -> None:
    query = chatml("What is 2+2?", "4")
    assert CHATML.split(query, "something the policy never saw") == ("What is 2+2?", "4")


@pytest.mark.parametrize("name, query, expected", [
    ("llama3", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>", ("Hi there", "Hello!")),
    ("hh", "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, by day.", ("Is the sky blue?", "Yes, by day.")),
    ("<<{prompt}>> ANSWER: {response} <END>", "<<Name a colour>> ANSWER: red <END>", ("Name a colour", "red")),
])
def test_presets_and_custom_templates(name: str, query: str, expected: tuple[str, str]) -> None:
    cfg = ServeConfig(query_template=name)
    assert QuerySplitter(cfg.resolved_template(), cfg.strip_tokens).split(query) == expected


def test_an_unsplittable_query_names_its_index() -> None:
    good = chatml("a", "b")
    with pytest.raises(SplitError, match="does not start with prompts\\[1\\] and it does not contain") as e:
        CHATML.split_all([good, "no template here"], [chatml("a"), "other prompt"])
    assert e.value.index == 1
    with pytest.raises(ValueError, match="1 prompts for 2 queries"):
        CHATML.split_all([good, good], [chatml("a")])


@pytest.mark.parametrize("template, message", [
    ("{response} then {prompt}", "contain '{prompt}' then '{response}'"),
    ("{prompt}{response}", "needs a separator"),
    ("no placeholders", "chatml, llama3, hh"),
])
def test_bad_templates_fail_at_start_up(template: str, message: str) -> None:
    with pytest.raises(ServeConfigError, match=message.replace("{", "\\{").replace("}", "\\}")):
        ServeConfig(query_template=template)
