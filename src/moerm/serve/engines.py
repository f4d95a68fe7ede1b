"""The inference engines' reward protocols: vLLM's `/classify` and `/pooling`, SGLang's `/v1/embeddings`.

RL frameworks call a discriminative reward model served by an engine; pointed at a moerm server, the same client
code gets moerm's rewards. The request and response shapes are the ones vLLM documents for reward and
classification models (its `ClassificationCompletionRequest` / `ClassificationChatRequest`, `PoolingCompletionRequest`
and their responses), and the ones verl's reward loop sends (`{"model", "input": str, "activation": false}` to
`/classify`, reading `data[-1]["probs"][-1]`; `{"model", "input"}` to SGLang's `/v1/embeddings`, reading
`data[-1]["embedding"][-1]`).

One input is one conversation, scored as one pair:
- `input`: a string, a list of strings, a list of token ids, or a list of such lists. Each is the reward model's
  chat-templated text of the whole conversation (prompt and reply), as verl builds it with
  `apply_chat_template(chat + [assistant reply], add_generation_prompt=False)`. It is split into the plain prompt
  and response by the same strict parser as OpenRLHF's `/get_reward` queries (`QuerySplitter` without `prompts`):
  one that does not parse is a 422 naming `input.N`, never a reward. Token ids are decoded first with the tokenizer
  of the query format (`--query-template auto` or `tokenizer:PATH`); with a preset there is no tokenizer to decode
  them, and they are refused.
- `messages` (a chat request): the conversation as messages, the last one the assistant's reply; no template.

Activation (`use_activation`, `activation` in vLLM before 0.11.2, `softmax` before that): vLLM applies a sigmoid to
a one-label classifier's score unless it is off; `/classify` does the same, so a client that asks for the raw
reward (`activation: false`, as verl does) gets exactly the reward `moerm score` gives, and one that leaves it on
gets sigmoid(reward). `/pooling` and `/v1/embeddings` give the raw reward unless activation is asked for.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from moerm.errors import UserError
from moerm.integrations.conversation import content_text, conversation_prompt
from moerm.serve.openrlhf import QuerySplitter, SplitError

TokenIds = list[StrictInt]


class EngineRequest(BaseModel):
    """The fields of vLLM's classify / pooling requests (and SGLang's embeddings request) a reward model uses.
    Unknown fields are ignored, as vLLM's own request models ignore them."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | TokenIds | list[TokenIds] | None = None
    messages: list[dict[str, Any]] | None = None
    use_activation: StrictBool | None = None
    activation: StrictBool | None = None  # vLLM < 0.11.2; verl sends it
    softmax: StrictBool | None = None  # older vLLM
    truncate_prompt_tokens: StrictInt | None = None
    encoding_format: StrictStr | None = None
    user: StrictStr | None = None


class ProtocolError(UserError):
    """A request the engine protocol cannot score: `field` names the part of the request that is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class Inputs:
    """A request's conversations as pairs: plain prompts and responses, one per input, in input order."""

    prompts: list[str]
    responses: list[str]
    texts: list[tuple[str, str]]  # (field, text) of each input as sent, for the server's character limits


def _is_ids(value: Any) -> bool:
    """One input given as token ids: a non-empty list of ints."""
    return isinstance(value, list) and bool(value) and all(isinstance(x, int) for x in value)


def activation(req: EngineRequest, default: bool) -> bool:
    """Whether the client asked for the activation (the first of use_activation, activation, softmax it set)."""
    for flag in (req.use_activation, req.activation, req.softmax):
        if flag is not None:
            return flag
    return default


def sigmoid(x: float | None) -> float | None:
    if x is None:
        return None
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def count_inputs(data: Any) -> int:
    """How many inputs a parsed request holds (before validation, for the item limit): a string or one id list is 1."""
    if not isinstance(data, dict):
        return 0
    value = data.get("input")
    if isinstance(value, list) and value and not _is_ids(value):
        return len(value)
    return 1 if value is not None or data.get("messages") is not None else 0


def split_inputs(req: EngineRequest, splitter: QuerySplitter | None,
                 decode: Callable[[list[int]], str] | None) -> Inputs:
    """The plain prompt and response of every input of `req`.

    Raises:
        ProtocolError: no input, both `input` and `messages`, options moerm cannot honour, token ids without a
            tokenizer to decode them, or an input that does not parse in the query format (naming `input.N`).
    """
    if req.truncate_prompt_tokens not in (None, -1):
        raise ProtocolError("truncate_prompt_tokens", "moerm truncates each input to its model's max_length itself; "
                                                      "send null or -1")
    if req.encoding_format not in (None, "float"):
        raise ProtocolError("encoding_format", f"{req.encoding_format!r} is not supported; send \"float\"")
    if (req.input is None) == (req.messages is None):
        raise ProtocolError("input", "send `input` (text or token ids) or `messages`, one of the two")
    if req.messages is not None:
        return _from_messages(req.messages)
    value = req.input
    single = isinstance(value, str) or _is_ids(value)
    items: list[Any] = [value] if single else list(value)  # type: ignore[arg-type]
    if not items:
        raise ProtocolError("input", "an empty list: send at least one input")
    prompts: list[str] = []
    responses: list[str] = []
    texts: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        field = "input" if single else f"input.{i}"
        if isinstance(item, list):
            if decode is None:
                raise ProtocolError(field, "token ids need the reward model's tokenizer to be read: start the server "
                                           "with --query-template auto (the run's backbone tokenizer) or "
                                           "tokenizer:PATH, or send the text")
            if not item:
                raise ProtocolError(field, "no token ids")
            try:
                item = decode(item)
            except (ValueError, IndexError, OverflowError, TypeError) as e:
                raise ProtocolError(field, f"cannot decode these token ids: {e}") from None
        texts.append((field, item))
        if splitter is None:
            raise ProtocolError(field, "the query format is not loaded yet")
        try:
            p, r = splitter.split(item, None, i)
        except SplitError as e:
            raise ProtocolError(field, f"cannot split into prompt and response: {e}") from None
        prompts.append(p)
        responses.append(r)
    return Inputs(prompts, responses, texts)


def _from_messages(messages: Sequence[dict[str, Any]]) -> Inputs:
    if not messages or messages[-1].get("role") != "assistant":
        raise ProtocolError("messages", "the last message must be the assistant's reply (role \"assistant\") to be "
                                        "scored")
    try:
        prompt = conversation_prompt(messages[:-1])
    except UserError as e:
        raise ProtocolError("messages", str(e)) from None
    if not prompt:
        raise ProtocolError("messages", "no user turn before the assistant's reply")
    response = content_text(messages[-1].get("content"))
    texts = [(f"messages.{i}.content", content_text(m.get("content"))) for i, m in enumerate(messages)]
    return Inputs([prompt], [response], texts)


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


def classify_response(model: str, rewards: Sequence[float | None], use_activation: bool,
                      tokens: int) -> dict[str, Any]:
    """vLLM's ClassificationResponse: one `data` entry per input, `probs` holding its one score."""
    scores = [sigmoid(r) if use_activation else r for r in rewards]
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "label": "reward", "probs": [s], "num_classes": 1} for i, s in enumerate(scores)],
            "usage": _usage(tokens)}


def pooling_response(model: str, rewards: Sequence[float | None], use_activation: bool,
                     tokens: int) -> dict[str, Any]:
    """vLLM's PoolingResponse: one `data` entry per input, its `data` the one-element pooled output."""
    scores = [sigmoid(r) if use_activation else r for r in rewards]
    return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": [{"index": i, "object": "pooling", "data": [s]} for i, s in enumerate(scores)],
            "usage": _usage(tokens)}


def embeddings_response(model: str, rewards: Sequence[float | None], use_activation: bool,
                        tokens: int) -> dict[str, Any]:
    """The OpenAI embeddings response SGLang gives a reward model: `embedding` holds its one score."""
    scores = [sigmoid(r) if use_activation else r for r in rewards]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": [s]} for i, s in enumerate(scores)],
            "usage": _usage(tokens)}
