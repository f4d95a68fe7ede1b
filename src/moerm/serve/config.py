"""Settings of the reward server: address, dynamic batching, queue bound, request and connection limits, auth,
query splitting."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from moerm.errors import UserError
from moerm.serve.openrlhf import DEFAULT_STRIP_TOKENS, check_query_template

API_KEY_ENV = "MOERM_API_KEY"
# Most bytes of a refused (413) body the server reads and discards so the client can finish sending and read its 413;
# past it (or past header_timeout_s) the connection is closed.
MAX_DRAIN_BYTES = 64 * 1024 * 1024

# How /get_reward splits OpenRLHF queries: a preset, `auto`, `tokenizer:PATH` or a `{prompt}...{response}` string
# (moerm/serve/openrlhf.py).
DEFAULT_QUERY_TEMPLATE = "chatml"


class ServeConfigError(UserError):
    """An invalid server setting, reported as one line."""


def read_api_key_file(path: str | os.PathLike[str]) -> str:
    """The API key stored in a file (surrounding whitespace and the final newline removed)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"cannot read the API key file {path}: {e}") from None
    if not key:
        raise ServeConfigError(f"the API key file {path} is empty")
    return key


@dataclass
class ServeConfig:
    """Everything `moerm serve` can be told.

    Attributes:
        host, port: where uvicorn listens.
        max_batch: most items scored in one `system.score` call (dynamic batching).
        max_wait_ms: how long the oldest queued request may wait for others to join its batch.
        batching: False scores each request alone, in arrival order (for comparison; the benchmark's "off").
        max_queue: most items waiting (not yet being scored); a request that would pass it gets 503 + Retry-After.
        max_items_per_request, max_chars_per_text: past them a request gets 413.
        max_request_chars: most characters in all the texts of one request together (413 past it): bounds the
            work one request can hand the single scoring worker.
        max_body_bytes: largest request body; a longer one is refused with 413 before it is read (by its
            Content-Length, or counted as a chunked body arrives).
        body_timeout_s: how long a request body may take to arrive once its headers have (408 past it).
        header_timeout_s: how long a connection may take to send a complete request head (request line and
            headers), from when it opens or its next request starts; past it the connection is closed.
        max_connections: most open connections. When a new one would pass it, the connection that has waited
            longest for a request (idle keep-alive, or a head still arriving) is closed to make room; if every one
            is in the middle of a request, new requests get 503.
        api_key: bearer token every request except /health must carry; None falls back to `api_key_file`, then
            $MOERM_API_KEY, and an empty value means no auth.
        api_key_file: a file holding the API key (keeps it out of `ps` and shell history).
        query_template: the policy's chat format, used to split OpenRLHF queries into prompt and response: a preset
            (chatml, llama3, hh, plain), `auto` (the chat template of the run's backbone tokenizer), `tokenizer:PATH`
            (the policy's tokenizer: its chat template and special tokens), or a string with `{prompt}` then
            `{response}` (single-turn).
        strip_tokens: padding / boundary tokens removed (repeatedly) from the ends of OpenRLHF queries (and the
            start of prompts) before splitting, besides the format's own (its tokenizer's BOS, EOS and pad).
            `max_chars_per_text` and `max_request_chars` count a query without them (older OpenRLHF clients pad a
            micro-batch's queries to the longest); the raw body is bounded by `max_body_bytes`.
        labels_as_domain: read each OpenRLHF `labels[i]` as the domain of query i (`openrlhf.label_domain`: a
            domain name, or an object with "domain"); off, labels are ignored and routed systems route by router.
        batch_size: the forward batch size passed to `system.score`.
        device: where the model is loaded (None: the system's default).
        quantize: "none" | "int8" (int8 dynamic quantization of the backbone after loading, CPU only; None: the
            saved config's model.quantize). Applies when the source is a run folder.
        torch_threads: torch's intra-op CPU threads (None: torch's default, one per core). On a CPU shared with
            other work, 1 avoids threads waiting on each other at every operator.
        retry_after_s: the Retry-After value (seconds) sent with 503.
        freeze_gc: once the model is loaded, move every object then alive out of the cyclic garbage collector's
            reach (`gc.freeze()`), so a full collection does not walk the model's objects and stall every request
            for ~0.1 s. Process-wide: turn off when embedding the app in a process whose long-lived objects must
            stay collectable.
        keep_alive_s: how long an idle keep-alive connection stays open. Longer than clients' own pool expiry
            (httpx: 5 s), so a client never sends on a connection the server is closing at that moment.
        max_batch_tokens: token budget of one forward pass (TEI's batching): a scoring call's pairs are sorted by
            token count and cut into passes of at most this many padded tokens (rows x longest row), each at most
            `batch_size` rows (`moerm/serve/forward.py`). None: passes of `batch_size` rows, as `score` cuts them.
        reload_poll_s: how often (seconds) the server checks the run folder's save marker and, when `moerm
            add-domain` has saved a new version, loads it and swaps to it without a restart (`moerm/serve/reload.py`);
            0 turns polling off (`POST /v1/reload` still swaps on demand). Only for a run-folder source.
        model_name: the `model` the engine protocols (/classify, /pooling, /v1/embeddings) answer with; None: the
            run folder's name.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_wait_ms: float = 5.0
    batching: bool = True
    max_queue: int = 1024
    max_items_per_request: int = 256
    max_chars_per_text: int = 32_000
    max_request_chars: int = 2_000_000
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int = 1000
    api_key: str | None = None
    api_key_file: str | None = None
    query_template: str = DEFAULT_QUERY_TEMPLATE
    strip_tokens: tuple[str, ...] = field(default=DEFAULT_STRIP_TOKENS)
    labels_as_domain: bool = False
    batch_size: int = 64
    device: str | None = None
    torch_threads: int | None = None
    quantize: str | None = None
    retry_after_s: int = 1
    keep_alive_s: float = 75.0
    freeze_gc: bool = True
    max_batch_tokens: int | None = None
    reload_poll_s: float = 2.0
    model_name: str | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and self.api_key_file is not None:
            raise ServeConfigError("give the API key once: api_key or api_key_file, not both")
        if self.api_key is None and self.api_key_file is not None:
            self.api_key = read_api_key_file(self.api_key_file)
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        elif self.api_key == "":
            self.api_key = None
        for name in ("max_batch", "max_queue", "max_items_per_request", "max_chars_per_text", "max_request_chars",
                     "max_body_bytes", "max_connections", "batch_size", "retry_after_s"):
            if int(getattr(self, name)) < 1:
                raise ServeConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_s"):
            if not float(getattr(self, name)) > 0:
                raise ServeConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ServeConfigError(f"max_batch_tokens must be >= 1; got {self.max_batch_tokens}")
        if not self.reload_poll_s >= 0:
            raise ServeConfigError(f"reload_poll_s must be >= 0 (0: no polling); got {self.reload_poll_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ServeConfigError(f"torch_threads must be >= 1; got {self.torch_threads}")
        if self.quantize is not None and self.quantize not in ("none", "int8"):
            raise ServeConfigError(f"quantize must be none or int8; got {self.quantize!r}")
        if self.max_wait_ms < 0:
            raise ServeConfigError(f"max_wait_ms must be >= 0; got {self.max_wait_ms}")
        if self.max_items_per_request > self.max_queue:
            raise ServeConfigError(f"max_items_per_request ({self.max_items_per_request}) must not exceed max_queue "
                                   f"({self.max_queue}): such a request could never be queued")
        self.strip_tokens = tuple(self.strip_tokens)
        try:
            check_query_template(self.query_template)  # fail at start-up, not on the first request
        except UserError as e:
            raise ServeConfigError(str(e)) from None

    def public(self) -> dict[str, object]:
        """The settings /v1/info reports (the API key is reported only as set or not)."""
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms, "batching": self.batching,
                "max_queue": self.max_queue, "max_items_per_request": self.max_items_per_request,
                "max_chars_per_text": self.max_chars_per_text, "max_request_chars": self.max_request_chars,
                "max_body_bytes": self.max_body_bytes, "body_timeout_s": self.body_timeout_s,
                "header_timeout_s": self.header_timeout_s, "max_connections": self.max_connections,
                "batch_size": self.batch_size, "max_batch_tokens": self.max_batch_tokens,
                "reload_poll_s": self.reload_poll_s, "labels_as_domain": self.labels_as_domain,
                "query_template": self.query_template, "auth": self.api_key is not None}
