"""Token-budget forward passes: the plan (hand-computed), rewards equal to offline `score` in input order, short
pairs not padded to long ones, and `benchmarks/serve_load.py --batch-sizes` at a tiny size."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import torch

from moerm.config import ModelConfig, RunConfig
from moerm.data.readers import write_jsonl
from moerm.serve import BackgroundServer, ServeConfig, create_app
from moerm.serve.app import system_score_fn
from moerm.serve.forward import budget_score, length_fn, plan_passes
from moerm.systems import build_system, load_system
from moerm.systems.base import ScoreOutput

from conftest import toy_pairs

ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_sorts_by_length_and_fills_each_pass_up_to_the_budget() -> None:
    lengths = [5, 30, 6, 28, 7, 100]
    # sorted: 5 (0), 6 (2), 7 (4), 28 (3), 30 (1), 100 (5); rows x longest <= 40
    assert plan_passes(lengths, 40) == [[0, 2, 4], [3], [1], [5]]  # 3 x 7 = 21; 4 x 28 = 112 > 40
    assert plan_passes(lengths, 60) == [[0, 2, 4], [3, 1], [5]]  # 2 x 30 = 60
    assert plan_passes(lengths, 40, max_rows=2) == [[0, 2], [4], [3], [1], [5]]  # 2 x 28 = 56 > 40
    assert plan_passes([], 10) == []
    assert plan_passes([3, 3, 3, 3], 1000, max_rows=3) == [[0, 1, 2], [3]]


def test_the_plan_cuts_where_lengths_jump_when_that_saves_more_padding_than_a_pass_costs() -> None:
    # one pass of all four fits the budget (4 x 100 = 400) but pads the short two to 100: 400 tokens + 32 for the
    # pass = 432; two passes cost 2 x 12 + 32 + 2 x 100 + 32 = 288
    assert plan_passes([10, 100, 12, 100], 400, pass_tokens=32) == [[0, 2], [1, 3]]
    # a pass costing more than the padding it saves: one pass (4 x 12 + 100 = 148) beats any split (200 in passes)
    assert plan_passes([10, 11, 12, 12], 400, pass_tokens=100) == [[0, 1, 2, 3]]
    # passes free: each length alone pads nothing (5 + 7 + 9 = 21 against 3 x 9 = 27 in one pass)
    assert plan_passes([5, 9, 7], 100, pass_tokens=0) == [[0], [2], [1]]


def test_the_plan_is_the_cheapest_partition_of_the_sorted_rows() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.choice([8, 20, 33, 64, 64, 128, 128]) for _ in range(rng.randint(1, 9))]
        budget, rows_cap, per_pass = rng.choice([128, 256, 512]), rng.choice([None, 2, 4]), rng.choice([0, 16, 64])

        def cost(passes: list[list[int]]) -> float:
            return sum(len(p) * max(lengths[i] for i in p) + per_pass for p in passes)

        plan = plan_passes(lengths, budget, rows_cap, per_pass)
        assert sorted(i for p in plan for i in p) == list(range(len(lengths)))
        for p in plan:
            assert len(p) == 1 or (len(p) * max(lengths[i] for i in p) <= budget
                                   and (rows_cap is None or len(p) <= rows_cap))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = float("inf")  # brute force: every way to cut the sorted rows into consecutive runs
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            runs, cur = [], [order[0]]
            for i, c in zip(order[1:], cuts):
                if c:
                    runs.append(cur)
                    cur = []
                cur.append(i)
            runs.append(cur)
            if all(len(r) == 1 or (len(r) * max(lengths[i] for i in r) <= budget
                                   and (rows_cap is None or len(r) <= rows_cap)) for r in runs):
                best = min(best, cost(runs))
        assert cost(plan) == best


class Counting:
    """reward = len(prompt) - len(response) / 100; records each call's pairs and batch_size."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str], domains: Sequence[str | None] | None = None,
              batch_size: int = 32) -> ScoreOutput:
        self.calls.append((list(prompts), batch_size))
        return ScoreOutput([len(p) - len(r) / 100 for p, r in zip(prompts, responses)],
                           [{"domain": d} for d in (domains or [None] * len(prompts))])


def test_budget_score_runs_one_call_per_pass_and_answers_in_input_order() -> None:
    fake = Counting()
    prompts = ["a" * n for n in (40, 4, 36, 8, 4)]
    responses = ["r"] * 5
    score = budget_score(fake.score, lambda ps, rs: [len(p) for p in ps], max_tokens=80)
    out = score(prompts, responses, ["x", "y", "z", "u", "v"], batch_size=64)
    assert out.rewards == [len(p) - 0.01 for p in prompts]
    assert [d["domain"] for d in out.details] == ["x", "y", "z", "u", "v"]
    # sorted 4, 4, 8 | 36, 40 (2 x 40 = 80): each pass one call whose batch_size is its rows
    assert [(len(c), bs) for c, bs in fake.calls] == [(3, 3), (2, 2)]
    assert [len(p) for p in fake.calls[0][0]] == [4, 4, 8]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: str) -> Path:
    root = tmp_path_factory.mktemp("budget-run")
    torch.manual_seed(0)
    build_system(RunConfig(system="baseline", model=ModelConfig(backbone=tiny_bert, max_length=64))).save(
        root / "run" / "model")
    return root / "run"


def mixed_pairs(n: int) -> tuple[list[str], list[str]]:
    rng = random.Random(1)
    words = "good bad answer question the a topic explain why how what".split()
    short = [(" ".join(rng.choices(words, k=2)), " ".join(rng.choices(words, k=2))) for _ in range(n // 2)]
    long = [(" ".join(rng.choices(words, k=20)), " ".join(rng.choices(words, k=25))) for _ in range(n - n // 2)]
    mixed = [p for pair in zip(short, long) for p in pair]
    return [p for p, _ in mixed], [r for _, r in mixed]


def test_token_budget_rewards_equal_offline_and_short_pairs_share_passes(baseline_run: Path) -> None:
    system = load_system(baseline_run)
    prompts, responses = mixed_pairs(24)
    offline = torch.tensor(system.score(prompts, responses, batch_size=4).rewards)
    counts, exact = length_fn(system)
    assert exact
    lengths = counts(prompts, responses)
    budget = 4 * sorted(lengths)[len(lengths) // 2]
    rows: list[int] = []
    real = system.score

    def recording(p: Sequence[str], r: Sequence[str], d: object = None, batch_size: int = 32) -> ScoreOutput:
        rows.append(len(p))
        return real(p, r, d, batch_size=batch_size)

    system.score = recording  # type: ignore[method-assign]
    out = system_score_fn(system, 64, budget)(prompts, responses, None)
    torch.testing.assert_close(torch.tensor(out.rewards), offline, atol=1e-5, rtol=0)
    assert sum(rows) == 24 and max(rows) > 4 and min(rows) < max(rows)  # short pairs: more rows per pass
    for idx in plan_passes(lengths, budget):
        assert len(idx) * max(lengths[i] for i in idx) <= budget or len(idx) == 1
    system.score = real  # type: ignore[method-assign]
    with BackgroundServer(create_app(system, ServeConfig(max_batch_tokens=budget, batch_size=64))) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/score", json={"items": [{"prompt": p, "response": x}
                                                             for p, x in zip(prompts, responses)]}, timeout=60)
        info = httpx.get(srv.url + "/v1/info").json()
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["rewards"]), offline, atol=1e-5, rtol=0)
    assert info["server"]["max_batch_tokens"] == budget


def test_serve_load_compares_server_and_offline_at_each_forward_batch_size(baseline_run: Path,
                                                                           tmp_path: Path) -> None:
    write_jsonl(toy_pairs(24, seed=3, domain="toy"), tmp_path / "data" / "toy" / "test.jsonl")
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(baseline_run),
                           "--data", str(tmp_path / "data"), "--inputs", "16", "--clients", "4", "--seconds", "2",
                           "--offline-seconds", "0.2", "--batch-sizes", "4,8", "--torch-threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["batch_size"] for r in res["by_batch_size"]] == [4, 8]
    for r in res["by_batch_size"]:
        assert r["max_batch_tokens"] == r["batch_size"] * res["median_tokens"]
        assert r["errors"] == 0 and r["lost"] == 0 and r["requests"] > 0
        assert r["max_abs_diff_vs_offline"] <= 1e-5
        assert r["offline_in_calls_pairs_per_s"] > 0 and 0 < r["server_loop_cpu_ms_per_pair"] < r["server_cpu_ms_per_pair"]
    assert res["checks"]["scores_equal_offline_1e-4"] and res["checks"]["zero_errors_and_lost"]


def test_the_server_tokenizes_each_pair_once_across_the_plan_and_the_scoring_call(baseline_run: Path) -> None:
    system = load_system(baseline_run)
    prompts, responses = mixed_pairs(12)
    offline = system.score(prompts, responses, batch_size=4).rewards
    encoded: list[tuple[str, str]] = []
    real = system.encoder._encode

    def counting(p: str, r: str) -> dict[str, list[int]]:
        encoded.append((p, r))
        return real(p, r)

    system.encoder._encode = counting  # type: ignore[method-assign]
    with BackgroundServer(create_app(system, ServeConfig(max_batch_tokens=256, batch_size=4))) as srv:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/score", json={"items": [{"prompt": p, "response": x}
                                                             for p, x in zip(prompts, responses)]}, timeout=60)
    assert r.status_code == 200, r.text
    torch.testing.assert_close(torch.tensor(r.json()["rewards"]), torch.tensor(offline), atol=1e-5, rtol=0)
    assert sorted(encoded) == sorted(zip(prompts, responses))  # counted and scored, each tokenized once
