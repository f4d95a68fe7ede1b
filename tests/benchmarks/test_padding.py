"""benchmarks/padding.py counts padded tokens by hand-checkable rules."""

from conftest import load_benchmark


def test_cut_every_rows_pads_each_pass_to_its_longest_sorted_row():
    script = load_benchmark("padding")
    assert script.every_rows([10, 1, 3, 2], 2) == 2 * 2 + 2 * 10  # sorted 1, 2 | 3, 10
    assert script.every_rows([5, 5, 5], 2) == 15
