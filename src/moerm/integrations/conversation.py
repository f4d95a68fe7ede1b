"""Chat messages as the plain prompt / response text a moerm reward system is trained and scored on.

A reward system reads a prompt the way the datasets give it: one user turn as its text, a multi-turn conversation
as an HH transcript (`Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...`, which `moerm.encoding.hh_messages` turns back
into turns for a decoder's chat template). System messages are dropped: they are the policy's instructions (often a
template's default, e.g. Qwen's "You are Qwen, ..."), not the user's request, and a router that read them would
route on boilerplate. Used by the TRL and verl reward functions and by the OpenRLHF query splitter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moerm.errors import UserError

_HH_ROLE = {"user": "Human", "assistant": "Assistant"}


def content_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a multimodal content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def conversation_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The plain prompt of a conversation: system messages dropped; a lone user turn as its text; several turns as
    an HH transcript (`Human: u1\\n\\nAssistant: a1\\n\\nHuman: u2`), contents stripped as `hh_messages` strips them.

    Raises:
        UserError: a message with a role other than system, user or assistant (a tool turn is not a prompt the
            reward model was trained on).
    """
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        role = m.get("role", "user")
        if role == "system":
            continue
        if role not in _HH_ROLE:
            raise UserError(f"message {i}: role {role!r}; a reward prompt holds system, user and assistant turns")
        turns.append((role, content_text(m.get("content"))))
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{_HH_ROLE[role]}: {text.strip()}" for role, text in turns)


def prompt_text(prompt: Any) -> str:
    """A prompt given as a string (itself), one message, or a list of messages (`conversation_prompt`)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        return conversation_prompt([prompt])
    if isinstance(prompt, (list, tuple)):
        return conversation_prompt([m if isinstance(m, Mapping) else {"role": "user", "content": str(m)}
                                    for m in prompt])
    raise TypeError(f"a prompt must be a string or a list of messages; got {type(prompt).__name__}")


def completion_text(completion: Any) -> str:
    """A completion given as a string (itself), or messages (the content of the last assistant message)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        last = (assistant or messages or [{}])[-1]
        return content_text(last.get("content"))
    raise TypeError(f"a completion must be a string or a list of messages; got {type(completion).__name__}")
