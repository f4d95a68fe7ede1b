"""`environment()` (bench/measure.py, below grid and report: no import circle) records the load average, and the
inference table prints it beside the figures."""

from moerm.bench import grid, report
from moerm.bench.measure import environment


def test_environment_records_the_load_average():
    env = environment()
    assert {"python", "torch", "threads", "device", "platform", "load_average"} <= set(env)
    assert len(env["load_average"]) == 3 and all(x >= 0 for x in env["load_average"])
    assert report.environment is environment and grid.environment is environment


def test_the_inference_table_shows_the_load_average():
    env = {**environment(), "load_average": [1.5, 1.25, 1.0]}
    inf = {"pairs": 4, "sequences": 8, "domains": ["a"], "batch_size": 2, "repeats": 1, "interleave": True,
           "environment": env, "rows": {"baseline": {"seconds_per_pair": 0.001, "pairs_per_second": 1000.0,
                                                     "time_vs_baseline": 1.0}}}
    assert "load average 1.50 / 1.25 / 1.00" in report.inference_markdown({"inference": inf})
