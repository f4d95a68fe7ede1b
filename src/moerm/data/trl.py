"""TRL's preference datasets, read as moerm pairs and written from them.

TRL (https://huggingface.co/docs/trl/dataset_formats) has four preference layouts:

    standard, explicit prompt      {"prompt": str, "chosen": str, "rejected": str}
    standard, implicit prompt      {"chosen": str, "rejected": str}              (the prompt is their common start)
    conversational, explicit       {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    conversational, implicit       {"chosen": [messages], "rejected": [messages]} (the prompt: their common turns)

`from_trl` turns a record of any of them into moerm's fields (the readers call it on every record, so `moerm data
validate`, `train` and `eval` read TRL JSON Lines, Parquet and `datasets` `save_to_disk` folders as they are):
a conversational prompt becomes the plain prompt `moerm score` reads (`integrations.conversation`: system messages
dropped, one user turn as its text, several as an HH transcript); a conversational reply is its assistant
messages' text; an implicit prompt is the common start of chosen and rejected (whole messages, or for strings up to
the last whitespace before they differ, as TRL's `extract_prompt` cuts). A record without `domain` gets the
readers' default: `--domain` where given, else the file's or folder's name.

`to_trl` writes a pair in the standard or conversational explicit layout (`moerm data convert --format to-trl`),
keeping `domain` and `id` as extra columns, which TRL ignores and `from_trl` reads back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moerm.data.schema import PreferencePair

TRL_FIELDS = ("prompt", "chosen", "rejected")


def _is_messages(value: Any) -> bool:
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


def is_trl_record(rec: Any) -> bool:
    """A record in one of TRL's layouts that moerm's own schema would not read: chat messages, no prompt, or no
    domain (TRL's standard explicit layout is moerm's without it)."""
    if not isinstance(rec, Mapping) or "chosen" not in rec or "rejected" not in rec:
        return False
    return ("prompt" not in rec or rec.get("domain") is None
            or any(_is_messages(rec.get(k)) for k in TRL_FIELDS))


def _messages(value: Any) -> list[dict[str, Any]]:
    value = value.tolist() if hasattr(value, "tolist") else value
    return [dict(m) for m in value]


def _reply(messages: Sequence[Mapping[str, Any]]) -> str:
    """A reply given as messages: its assistant messages' text (all of them when several)."""
    from moerm.integrations.conversation import content_text

    replies = [content_text(m.get("content")) for m in messages if m.get("role") == "assistant"]
    return "\n\n".join(replies) if replies else "\n\n".join(content_text(m.get("content")) for m in messages)


def _common_string_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)):  # they differ inside a word: back up to the whitespace before it
        while n > 0 and not a[n - 1].isspace():
            n -= 1
    return a[:n]


def from_trl(rec: Mapping[str, Any]) -> dict[str, Any]:
    """moerm's prompt / chosen / rejected from a TRL record (other columns kept); records that are not in a TRL-only
    layout come back unchanged. Malformed values are left for the schema check to report by field."""
    from moerm.integrations.conversation import conversation_prompt

    if not is_trl_record(rec):
        return dict(rec)
    out = dict(rec)
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if _is_messages(chosen) and _is_messages(rejected):
        c, r = _messages(chosen), _messages(rejected)
        if "prompt" in rec and _is_messages(rec["prompt"]):
            prompt = _messages(rec["prompt"])
        elif "prompt" in rec:
            prompt = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
        else:  # implicit: the common leading turns are the prompt
            k = 0
            while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
                k += 1
            prompt, c, r = c[:k], c[k:], r[k:]
        out["prompt"] = conversation_prompt(prompt) if isinstance(prompt, list) else prompt
        out["chosen"], out["rejected"] = _reply(c), _reply(r)
    elif isinstance(chosen, str) and isinstance(rejected, str) and "prompt" not in rec:
        prompt = _common_string_prefix(chosen, rejected)
        out["prompt"], out["chosen"], out["rejected"] = prompt.rstrip(), chosen[len(prompt):], rejected[len(prompt):]
    return out


def to_trl(pair: PreferencePair, conversational: bool = False) -> dict[str, Any]:
    """A pair in TRL's explicit-prompt layout (standard strings, or conversational messages)."""
    from moerm.encoding.pairs import hh_messages

    if conversational:
        prompt: Any = hh_messages(pair.prompt) or [{"role": "user", "content": pair.prompt}]
        rec = {"prompt": prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
               "rejected": [{"role": "assistant", "content": pair.rejected}]}
    else:
        rec = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    return {**rec, "domain": pair.domain, "id": pair.id}


def write_trl(pairs: Sequence[PreferencePair], out: str | Path, conversational: bool = False) -> Path:
    """TRL JSON Lines (one record per pair), written atomically."""
    import json

    from moerm.train.checkpoint import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(to_trl(p, conversational), ensure_ascii=False) + "\n" for p in pairs))
    return out
