"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: counters, fixed-bucket
histograms and gauges, safe to update from any thread."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(v: float) -> str:
    """A sample value: integers without a decimal point, +Inf for the last bucket."""
    v = float(v)
    if v == float("inf"):
        return "+Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')) for k, v in pairs]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Histogram:
    """Cumulative-bucket histogram of one labelled series set."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets)) + (float("inf"),)
        self.counts: dict[tuple[tuple[str, str], ...], list[int]] = defaultdict(lambda: [0] * len(self.buckets))
        self.sums: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def observe(self, value: float, labels: tuple[tuple[str, str], ...] = ()) -> None:
        counts = self.counts[labels]
        for i, b in enumerate(self.buckets):
            if value <= b:
                counts[i] += 1
                break
        self.sums[labels] += value

    def lines(self, name: str) -> list[str]:
        out = []
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for b, c in zip(self.buckets, counts):
                running += c
                out.append(f"{name}_bucket{_labels(labels + (('le', _fmt(b)),))} {running}")
            out.append(f"{name}_sum{_labels(labels)} {_fmt(self.sums[labels])}")
            out.append(f"{name}_count{_labels(labels)} {running}")
        return out


class ServerMetrics:
    """What /metrics reports: requests by endpoint and status, pairs scored, batches and their sizes, request
    latency, rejected requests, and the queue depth (read live from the batcher)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.pairs_scored = 0
        self.batches = 0
        self.rejected: dict[tuple[tuple[str, str], ...], int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS_S)
        self.batch_items = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS_S)
        self.queue_items: Callable[[], int] = lambda: 0
        self.queue_requests: Callable[[], int] = lambda: 0
        self.in_flight = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(("endpoint", endpoint), ("status", str(status)))] += 1
            self.latency.observe(seconds, (("endpoint", endpoint),))

    def observe_batch(self, n_items: int, n_requests: int, seconds: float) -> None:
        with self._lock:
            self.batches += 1
            self.pairs_scored += n_items
            self.batch_items.observe(n_items)
            self.batch_requests.observe(n_requests)
            self.batch_seconds.observe(seconds)

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_finished(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def observe_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[(("reason", reason),)] += 1

    def render(self) -> str:
        """The Prometheus text format."""
        with self._lock:
            out: list[str] = []

            def block(name: str, kind: str, help_: str, lines: list[str]) -> None:
                out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines])

            block("moerm_requests_total", "counter", "HTTP requests by endpoint and status code.",
                  [f"moerm_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())])
            block("moerm_pairs_scored_total", "counter", "Prompt/response pairs scored.",
                  [f"moerm_pairs_scored_total {self.pairs_scored}"])
            block("moerm_batches_total", "counter", "Scoring batches run.", [f"moerm_batches_total {self.batches}"])
            block("moerm_rejected_total", "counter", "Requests refused before scoring, by reason.",
                  [f"moerm_rejected_total{_labels(k)} {v}" for k, v in sorted(self.rejected.items())])
            block("moerm_request_latency_seconds", "histogram", "Request latency in seconds, by endpoint.",
                  self.latency.lines("moerm_request_latency_seconds"))
            block("moerm_batch_size_items", "histogram", "Items per scoring batch.",
                  self.batch_items.lines("moerm_batch_size_items"))
            block("moerm_batch_size_requests", "histogram", "Requests per scoring batch.",
                  self.batch_requests.lines("moerm_batch_size_requests"))
            block("moerm_batch_seconds", "histogram", "Seconds per scoring batch (the model call).",
                  self.batch_seconds.lines("moerm_batch_seconds"))
            block("moerm_queue_depth_items", "gauge", "Items waiting to be scored.",
                  [f"moerm_queue_depth_items {self.queue_items()}"])
            block("moerm_queue_depth_requests", "gauge", "Requests waiting to be scored.",
                  [f"moerm_queue_depth_requests {self.queue_requests()}"])
            block("moerm_requests_in_flight", "gauge", "Requests being handled now.",
                  [f"moerm_requests_in_flight {self.in_flight}"])
            return "\n".join(out) + "\n"
