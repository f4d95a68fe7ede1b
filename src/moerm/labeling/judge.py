"""Capability labels from an LLM judge behind an OpenAI-compatible chat-completions endpoint.

Each (pair, capability) is asked twice, the second time with the replies swapped; a label is kept only when both
answers pick the same reply, which removes the judge's position bias instead of learning it. Answers go to a
JSON Lines cache as they arrive, so an interrupted run resumes without paying for the same question twice.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from moerm.data.schema import PreferencePair
from moerm.errors import UserError
from moerm.labeling.aspects import oriented_pair

logger = logging.getLogger(__name__)

Verdict = Literal["A", "B"]

# Part of every cache key: changing the wording below must change this, or old answers would be reused.
PROMPT_VERSION = "1"
_SYSTEM = "You are a careful, impartial judge. You compare two replies to the same prompt on one capability only."
_USER = """Compare the two replies to the prompt below on {capability} only; ignore every other quality.

[Prompt]
{prompt}

[Reply A]
{first}

[Reply B]
{second}

Which reply is better on {capability}? Reason briefly if you need to, then end with a last line that is exactly \
"Answer: A" or "Answer: B"."""

_RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx
_FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, model or URL: every other question would fail the same way
_TRANSIENT = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
_MAX_CACHED_ANSWER = 2000  # characters of the raw answer kept for auditing


class JudgeConfigError(UserError):
    """The judge cannot run at all: missing base URL or model, bad options, or the endpoint refused us."""


class JudgeError(RuntimeError):
    """One question could not be answered (retries exhausted or a non-retryable reply)."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask. `api_key` is left out of repr so it never reaches a log or traceback."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    max_retries: int = 4
    timeout: float = 60.0
    backoff: float = 1.0  # first retry waits about this many seconds, then doubles
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise JudgeConfigError(f"judge base URL must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise JudgeConfigError("judge needs concurrency >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")

    @classmethod
    def resolve(cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                **options: Any) -> JudgeConfig:
        """Options win over MOERM_JUDGE_* variables, which win over OPENAI_BASE_URL / OPENAI_API_KEY."""
        env = os.environ.get
        base_url = base_url or env("MOERM_JUDGE_BASE_URL") or env("OPENAI_BASE_URL")
        model = model or env("MOERM_JUDGE_MODEL")
        api_key = api_key or env("MOERM_JUDGE_API_KEY") or env("OPENAI_API_KEY")
        if not base_url:
            raise JudgeConfigError("no judge base URL: pass --base-url or set MOERM_JUDGE_BASE_URL")
        if not model:
            raise JudgeConfigError("no judge model: pass --model or set MOERM_JUDGE_MODEL")
        return cls(base_url=base_url.rstrip("/"), model=model, api_key=api_key or None, **options)


def build_messages(capability: str, prompt: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat messages asking whether `first` (A) or `second` (B) is better on `capability`."""
    user = _USER.format(capability=capability, prompt=prompt, first=first, second=second)
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


# A verdict line once markdown and brackets are stripped: "Answer: A", "Final verdict - B", "Reply A", "A", ...
# Only capital A/B count, so "Answer: a tie" is not read as a verdict.
_VERDICT = re.compile(
    r"(?:(?i:the\s+)?(?i:final\s+)?(?i:answer|verdict|better\s+reply|better\s+response|better)"
    r"\s*(?i:is)?\s*[:=\-]?\s*)?"
    r"(?:(?i:reply|response)\s+)?([AB])(?:\s+(?i:is\s+better))?"
)


def parse_verdict(text: str) -> Verdict | None:
    """The judge's final verdict: the last line that reads as "A" or "B"; None when there is none (malformed)."""
    for line in reversed(text.splitlines()):
        clean = re.sub(r"[*_`#>\[\]()\"']", "", line).strip().rstrip(".!").strip()
        m = _VERDICT.fullmatch(clean)
        if m:
            return m.group(1)  # type: ignore[return-value]  # the regex only captures "A" or "B"
    return None


def cache_key(model: str, capability: str, prompt: str, first: str, second: str) -> str:
    """sha256 of everything that determines the answer (temperature is always 0)."""
    blob = json.dumps([model, capability, prompt, first, second, PROMPT_VERSION], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class AnswerCache:
    """Judge answers as JSON Lines {"key", "verdict", "answer"}, appended and flushed one per answer.

    Single writer: two runs sharing one cache file at the same time may interleave lines.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.answers: dict[str, Verdict | None] = {}
        self._file: IO[str] | None = None
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, verdict = rec["key"], rec["verdict"]
                if not isinstance(key, str) or verdict not in ("A", "B", None):
                    raise ValueError("bad fields")
            except (ValueError, KeyError, TypeError):
                # A run killed mid-write leaves a truncated last line; the question is simply asked again.
                where = "last line" if i == len(lines) else f"line {i}"
                logger.warning("%s: ignoring unreadable cache %s", path, where)
                continue
            self.answers[key] = verdict

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def add(self, key: str, verdict: Verdict | None, answer: str) -> None:
        self.answers[key] = verdict
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A truncated last line has no newline; start on a fresh line so the next record is not glued to it.
            self._file = self.path.open("a", encoding="utf-8")
            if self._file.tell() > 0 and not _ends_with_newline(self.path):
                self._file.write("\n")
        rec = {"key": key, "verdict": verdict, "answer": answer[:_MAX_CACHED_ANSWER]}
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()  # per answer: a killed run loses at most the line being written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class ChatClient:
    """Minimal chat-completions client on urllib, with retries and exponential backoff."""

    def __init__(self, config: JudgeConfig):
        self.config = config
        self.url = f"{config.base_url}/chat/completions"
        self._opener = urllib.request.build_opener()

    def _sleep_before(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.config.max_backoff, self.config.backoff * 2 ** attempt)
        if retry_after and retry_after.isdigit():  # a server-requested wait (429) overrides ours, within the cap
            delay = min(self.config.max_backoff, float(retry_after))
        time.sleep(delay * random.uniform(0.75, 1.25))  # jitter: concurrent workers should not retry in lockstep

    def complete(self, messages: list[dict[str, str]]) -> tuple[str, int]:
        """The reply text and the number of attempts it took. Raises JudgeError, or JudgeConfigError on 401/403/404."""
        body = json.dumps({"model": self.config.model, "messages": messages, "temperature": 0}).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        attempts = self.config.max_retries + 1
        last = ""
        for attempt in range(attempts):
            retry_after = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self._opener.open(req, timeout=self.config.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                try:
                    detail = e.read(300).decode("utf-8", "replace").strip()
                except (OSError, http.client.HTTPException):
                    detail = ""
                last = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code in _FATAL_STATUS:
                    raise JudgeConfigError(f"judge endpoint {self.url} refused the request: {last}") from None
                if e.code not in _RETRY_STATUS and e.code < 500:
                    raise JudgeError(last, attempt + 1) from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except _TRANSIENT as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            else:
                content = _content(raw)
                if content is None:  # the server answered, just not in this protocol: asking again will not help
                    raise JudgeError(f"reply is not a chat completion: {raw[:200]!r}", attempt + 1)
                return content, attempt + 1
            if attempt + 1 < attempts:
                self._sleep_before(attempt, retry_after)
        raise JudgeError(f"no answer after {attempts} attempts ({last})", attempts)


def _content(raw: bytes) -> str | None:
    """`choices[0].message.content`, or None for a body that is no chat completion.

    A null content (refusal, tool call) is an empty answer, so it ends up malformed rather than failed.
    """
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else ""


@dataclass(frozen=True)
class _Question:
    key: str
    messages: list[dict[str, str]]
    label: str  # "pair id / capability / order", for log lines


def judge_pairs(
    pairs: Sequence[PreferencePair],
    capabilities: Sequence[str],
    config: JudgeConfig,
    cache_path: str | Path | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> tuple[list[PreferencePair], dict[str, int]]:
    """Ask the judge about every (pair, capability) in both orders; keep the labels where both orders agree.

    `descriptions` (capability -> one line, e.g. from a DMoERM tasks file) are shown to the judge after the name.

    Returns the kept pairs (better reply as `chosen`, id "{id}:{capability}", subset = capability) in input order,
    and counts: judged (pair x capability), kept, flipped (kept against the overall label), disagreements,
    malformed (an answer with no verdict), failed (a question with no answer); asked (questions sent),
    cached (questions answered from the cache), attempts (HTTP requests, retries included).
    Raises JudgeConfigError when the endpoint rejects the key, model or URL (401/403/404).
    """
    cache = AnswerCache(cache_path)
    # Per (pair, capability): the two keys, chosen shown first then second; questions de-duplicated by key.
    plan: list[tuple[PreferencePair, str, str, str]] = []
    todo: dict[str, _Question] = {}
    for pair in pairs:
        for cap in capabilities:
            keys = []
            desc = (descriptions or {}).get(cap)
            asked_as = f"{cap} ({desc})" if desc else cap
            for order, (first, second) in enumerate(((pair.chosen, pair.rejected), (pair.rejected, pair.chosen))):
                key = cache_key(config.model, asked_as, pair.prompt, first, second)
                keys.append(key)
                if key not in cache and key not in todo:
                    todo[key] = _Question(key, build_messages(asked_as, pair.prompt, first, second),
                                          f"{pair.id} / {cap} / order {order + 1}")
            plan.append((pair, cap, keys[0], keys[1]))

    report = {"judged": len(plan), "kept": 0, "flipped": 0, "disagreements": 0, "malformed": 0, "failed": 0,
              "asked": len(todo), "cached": 2 * len(plan) - len(todo), "attempts": 0}
    failed: set[str] = set()
    client = ChatClient(config)
    pool = ThreadPoolExecutor(max_workers=config.concurrency)
    try:
        futures = {pool.submit(client.complete, q.messages): q for q in todo.values()}
        # Answers are cached here on the calling thread as they complete, so the cache file needs no lock.
        for fut in as_completed(futures):
            q = futures[fut]
            try:
                answer, attempts = fut.result()
            except JudgeError as e:
                report["attempts"] += e.attempts
                failed.add(q.key)
                logger.warning("judge failed on %s: %s", q.label, e)
                continue
            report["attempts"] += attempts
            cache.add(q.key, parse_verdict(answer), answer)
    finally:
        # Normally nothing is left; on JudgeConfigError or Ctrl-C, queued questions are dropped, not sent.
        pool.shutdown(wait=True, cancel_futures=True)
        cache.close()

    kept: list[PreferencePair] = []
    for pair, cap, key1, key2 in plan:
        if key1 in failed or key2 in failed:
            report["failed"] += 1
            continue
        v1, v2 = cache.answers[key1], cache.answers[key2]
        if v1 is None or v2 is None:
            report["malformed"] += 1
        elif v1 == v2:  # the same position both times: the judge followed the slot, not the reply
            report["disagreements"] += 1
        else:
            chosen_is_better = v1 == "A"  # in the first order, A is the original `chosen`
            kept.append(oriented_pair(pair, cap, chosen_is_better))
            report["kept"] += 1
            report["flipped"] += not chosen_is_better
    return kept, report
