"""The one record type every reader, converter and system shares: a preference pair."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from moerm.errors import UserError

REQUIRED_FIELDS: tuple[str, ...] = ("id", "domain", "prompt", "chosen", "rejected")
OPTIONAL_FIELDS: tuple[str, ...] = ("subset", "margin", "aspects_chosen", "aspects_rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One human (or gold) preference: `chosen` is the better reply to `prompt` than `rejected`."""

    id: str
    domain: str
    prompt: str
    chosen: str
    rejected: str
    subset: str | None = None
    margin: float | None = None
    aspects_chosen: dict[str, float] | None = field(default=None, hash=False, compare=True)
    aspects_rejected: dict[str, float] | None = field(default=None, hash=False, compare=True)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready dict, leaving out optional fields that are unset."""
        d = asdict(self)
        return {k: v for k, v in d.items() if k in REQUIRED_FIELDS or v is not None}


class InvalidRecord(UserError):
    """A record that breaks the schema; carries where it came from and which field is wrong."""

    def __init__(self, source: str, line: int | None, field_name: str | None, reason: str):
        self.source = source
        self.line = line
        self.field = field_name
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.reason}"


def _check_text(rec: dict[str, Any], name: str, source: str, line: int | None) -> str:
    if name not in rec or rec[name] is None:
        raise InvalidRecord(source, line, name, "missing required field")
    value = rec[name]
    if not isinstance(value, str):
        raise InvalidRecord(source, line, name, f"expected a string, got {type(value).__name__}")
    if name in ("chosen", "rejected", "domain", "id") and not value.strip():
        raise InvalidRecord(source, line, name, "empty text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (e.g. "\ud800" in JSON): no tokenizer can read it
        raise InvalidRecord(source, line, name, f"not valid Unicode text (lone surrogate at character {e.start})") from None
    return value


def _finite(value: Any) -> float | None:
    """`value` as a finite float, or None when it is no number, not finite, or too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return f if math.isfinite(f) else None


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 200 else f"a {len(str(abs(value)))}-digit integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _check_aspects(rec: dict[str, Any], name: str, source: str, line: int | None) -> dict[str, float] | None:
    value = rec.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRecord(source, line, name, f"expected an object {{aspect: number}}, got {type(value).__name__}")
    out: dict[str, float] = {}
    for k, v in value.items():
        f = _finite(v)
        if f is None:
            raise InvalidRecord(source, line, f"{name}.{k}", f"expected a finite number, got {_shown(v)}")
        out[str(k)] = f
    return out


def validate_record(rec: Any, source: str, line: int | None = None) -> PreferencePair:
    """Turn a raw dict into a PreferencePair, or raise InvalidRecord naming file, line and field."""
    if not isinstance(rec, dict):
        raise InvalidRecord(source, line, None, f"expected a JSON object, got {type(rec).__name__}")
    texts = {name: _check_text(rec, name, source, line) for name in REQUIRED_FIELDS}
    domain = texts["domain"]
    if any(c in domain for c in "/\\\x00") or domain.strip() in (".", "..") or domain != domain.strip():
        raise InvalidRecord(source, line, "domain", f"{domain!r} is not a valid domain name (no '/', '\\', NUL, "
                            "surrounding spaces, '.' or '..': domain names become folder and adapter names)")
    if " ".join(texts["chosen"].split()) == " ".join(texts["rejected"].split()):
        raise InvalidRecord(source, line, "rejected", "chosen and rejected are identical (up to whitespace)")
    subset = rec.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise InvalidRecord(source, line, "subset", f"expected a string, got {type(subset).__name__}")
    margin = rec.get("margin")
    if margin is not None:
        value = _finite(margin)
        if value is None:
            raise InvalidRecord(source, line, "margin", f"expected a finite number, got {_shown(margin)}")
        margin = value
    return PreferencePair(
        id=texts["id"],
        domain=texts["domain"],
        prompt=texts["prompt"],
        chosen=texts["chosen"],
        rejected=texts["rejected"],
        subset=subset,
        margin=margin,
        aspects_chosen=_check_aspects(rec, "aspects_chosen", source, line),
        aspects_rejected=_check_aspects(rec, "aspects_rejected", source, line),
    )
