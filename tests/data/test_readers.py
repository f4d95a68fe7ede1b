"""Readers: every format, every validation error with file/line/field, skip-mode reporting, path resolution."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from moerm.data.readers import DataError, load_pairs, resolve_data_paths, write_jsonl
from moerm.data.schema import InvalidRecord, PreferencePair


def rec(i: int, **over: Any) -> dict[str, Any]:
    """A valid raw record; `over` replaces or (with value ...) removes fields."""
    r: dict[str, Any] = {"id": f"r{i}", "domain": "d", "prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def dumps(records: list[dict[str, Any]]) -> list[str | bytes]:
    return [json.dumps(r) for r in records]


def assert_invalid(err: InvalidRecord, path: Path, line: int | None, field: str | None) -> None:
    assert (err.source, err.line, err.field) == (str(path), line, field)
    assert str(err).startswith(f"{path}:{line}: " if line else f"{path}: ")


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("bad", "field", "reason"),
    [
        (rec(2, chosen=...), "chosen", "missing"),
        (rec(2, prompt=3), "prompt", "expected a string"),
        (rec(2, rejected="  "), "rejected", "empty text"),
        (rec(2, rejected="good 2"), "rejected", "identical"),
        (rec(2, aspects_chosen={"a": "x"}), "aspects_chosen.a", "finite number"),
        (rec(2, aspects_rejected=[1, 2]), "aspects_rejected", "expected an object"),
        (rec(2, margin="big"), "margin", "finite number"),
    ],
)
def test_invalid_record_names_file_line_field(tmp_path: Path, bad: dict[str, Any], field: str, reason: str) -> None:
    path = write_lines(tmp_path / "x.jsonl", dumps([rec(1), bad, rec(3)]))
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([path])
    assert_invalid(exc.value, path, 2, field)
    assert reason in exc.value.reason


def test_invalid_json_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", [json.dumps(rec(1)), "", '{"id": "r2", oops}'])
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([path])
    assert_invalid(exc.value, path, 3, None)  # the blank line 2 still counts for numbering
    assert "invalid JSON" in str(exc.value)


def test_invalid_utf8_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl.gz", [json.dumps(rec(1)), b'{"id": "r2", "prompt": "\xff\xfe"}'])
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([path])
    assert_invalid(exc.value, path, 2, None)
    assert "invalid UTF-8" in str(exc.value)


@pytest.mark.parametrize("content", [b"this is not gzip at all", gzip.compress(b'{"id": 1}\n' * 100)[:30]])
def test_unreadable_gzip_is_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: cannot read gzip file, it is corrupt or truncated"):
        load_pairs([path], on_invalid="skip")


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", dumps([rec(1), rec(2)]))
    b = write_lines(tmp_path / "b.jsonl", dumps([rec(3), rec(2, prompt="other")]))
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([a, b])
    assert_invalid(exc.value, b, 2, "id")
    assert f"duplicate id, first seen at {a}:2" in str(exc.value)


def test_skip_mode_counts_and_reports_every_invalid(tmp_path: Path) -> None:
    lines: list[str | bytes] = [
        json.dumps(rec(1)),
        json.dumps(rec(2, chosen=...)),
        "not json",
        b"\xff",
        json.dumps(rec(5, rejected="good 5")),
        json.dumps(rec(1, prompt="dup")),
        json.dumps(rec(7, aspects_chosen={"a": None})),
        json.dumps(rec(8)),
    ]
    path = write_lines(tmp_path / "x.jsonl", lines)
    pairs, report = load_pairs([path], on_invalid="skip")
    assert [p.id for p in pairs] == ["r1", "r8"]
    assert (report.n_read, report.n_valid, report.n_invalid) == (8, 2, 6)
    assert [(e.line, e.field) for e in report.invalid] == [
        (2, "chosen"), (3, None), (4, None), (5, "rejected"), (6, "id"), (7, "aspects_chosen.a")
    ]
    summary = report.summary(max_reasons=2)
    assert summary.splitlines()[0] == "8 records read: 2 valid, 6 invalid"
    assert f"{path}:2: field 'chosen'" in summary and "... and 4 more" in summary


def test_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "x.jsonl", ["[1, 2]"])
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([path])
    assert_invalid(exc.value, path, 1, None)


# ---------------------------------------------------------------- formats


def test_jsonl_and_gz_roundtrip_with_write_jsonl(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("a", "d", "p", "c", "r"),
        PreferencePair("b", "e", "p", "c ü", "r", subset="s", margin=1.5, aspects_chosen={"x": 1.0}),
    ]
    for name in ("out.jsonl", "sub/out.jsonl.gz"):
        out = write_jsonl(pairs, tmp_path / name)
        assert load_pairs([out])[0] == pairs
    assert gzip.decompress((tmp_path / "sub/out.jsonl.gz").read_bytes()).count(b"\n") == 2
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["out.jsonl.gz"]  # no temp file left


def test_json_list_and_data_key(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps([rec(1), rec(2)]))
    b = tmp_path / "b.json.gz"
    b.write_bytes(gzip.compress(json.dumps({"data": [rec(3), rec(4, chosen=...)]}).encode()))
    pairs, report = load_pairs([a, b], on_invalid="skip")
    assert [p.id for p in pairs] == ["r1", "r2", "r3"]
    assert_invalid(report.invalid[0], b, 2, "chosen")  # line = 1-based index in the list


def test_json_not_parsable_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n{"id": 1},\n oops]')
    with pytest.raises(DataError, match=r"a\.json:3: invalid JSON"):
        load_pairs([path])


def test_csv_with_aspects_margin_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected", "margin", "aspects_chosen", "aspects_rejected", "domain"])
        w.writerow(["multi\nline prompt", "c1", "r1", "0.5", '{"fluency": 4}', '{"fluency": 2}', ""])
        w.writerow(["p2", "c2", "r2", "", "", "", "other"])
        w.writerow(["p3", "c3", "r3", "", "{not json", "", ""])
        w.writerow(["p4", "same", "same", "", "", "", ""])
    pairs, report = load_pairs([path], on_invalid="skip", default_domain="web")
    assert pairs[0] == PreferencePair(
        "pairs-2", "web", "multi\nline prompt", "c1", "r1", margin=0.5,
        aspects_chosen={"fluency": 4.0}, aspects_rejected={"fluency": 2.0},
    )
    assert (pairs[1].id, pairs[1].domain, pairs[1].margin) == ("pairs-4", "other", None)  # line 4: row 1 spans 2-3
    assert [(e.line, e.field) for e in report.invalid] == [(5, "aspects_chosen"), (6, "rejected")]
    assert all(e.source == str(path) for e in report.invalid)


def test_csv_without_a_domain_column_is_one_domain_named_after_the_file(tmp_path: Path) -> None:
    """TRL's standard layout (prompt, chosen, rejected, no domain): one domain, the file's name, or --domain."""
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\n")
    assert [x.domain for x in load_pairs([path])[0]] == ["p"]
    assert [x.domain for x in load_pairs([path], default_domain="math")[0]] == ["math"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"prompt": "p", "chosen": "c", "rejected": "r", "domain": ""}\n')  # an empty one is an error
    with pytest.raises(InvalidRecord) as exc:
        load_pairs([jsonl])
    assert_invalid(exc.value, jsonl, 1, "domain")


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    rows = [rec(1, aspects_chosen={"a": 1.0}), rec(2, aspects_chosen={"b": 2.0}), rec(3, chosen="")]
    pq.write_table(pa.Table.from_pylist(rows), path)
    pairs, report = load_pairs([path], on_invalid="skip")
    # Arrow unifies the structs to {a, b}; the None it fills in must not become an invalid aspect.
    assert [p.aspects_chosen for p in pairs] == [{"a": 1.0}, {"b": 2.0}]
    assert_invalid(report.invalid[0], path, 3, "chosen")


def test_parquet_corrupt_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"t\.parquet: cannot read Parquet file"):
        load_pairs([path])


def test_datasets_save_to_disk_with_column_map(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"question": ["q1", "q2", "q3"], "good": ["a", "b", "c"], "bad": ["x", "y", "c"]}
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    cmap = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pairs, report = load_pairs([folder], on_invalid="skip", column_map=cmap, default_domain="qa")
    assert [(p.id, p.prompt, p.chosen, p.rejected, p.domain) for p in pairs] == [
        ("saved-1", "q1", "a", "x", "qa"), ("saved-2", "q2", "b", "y", "qa")
    ]
    assert_invalid(report.invalid[0], folder, 3, "rejected")


def test_datasets_dict_split_in_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    mk = lambda i: datasets.Dataset.from_list([rec(i)])  # noqa: E731
    datasets.DatasetDict({"train": mk(1), "test": mk(2)}).save_to_disk(str(tmp_path / "dd"))
    assert [p.id for p in load_pairs([tmp_path / "dd"], split="test")[0]] == ["r2"]
    assert [p.id for p in load_pairs([tmp_path / "dd"])[0]] == ["r2", "r1"]  # splits in sorted order
    # Inside a searched folder a DatasetDict counts when one of its splits fits; a single Dataset by its name.
    mk(3).save_to_disk(str(tmp_path / "train_extra"))
    assert [p.id for p in load_pairs([tmp_path], split="train")[0]] == ["r1", "r3"]
    assert [p.id for p in load_pairs([tmp_path], split="test")[0]] == ["r2"]


def test_hf_hub_offline_is_clear_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as exc:
        load_pairs(["hf:moerm-test-nonexistent/no-such-dataset:train"])
    msg = str(exc.value)
    assert "hf:moerm-test-nonexistent/no-such-dataset" in msg and "Hub could not be reached" in msg
    assert "local" in msg and "\n" not in msg


def test_datasets_missing_tells_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"pip install moerm\[hf\]"):
        load_pairs(["hf:anything"])


# ---------------------------------------------------------------- path resolution


def make_tree(root: Path) -> None:
    for domain in ("hh_harmless", "llmbar"):
        for split in ("train", "test", "dev", "validation", "eval"):
            write_lines(root / domain / f"{split}.jsonl.gz", dumps([rec(0, id=f"{domain}-{split}")]))
    (root / "hh_harmless" / "README.md").write_text("not data")


def test_resolve_folder_by_split(tmp_path: Path) -> None:
    make_tree(tmp_path)
    train = resolve_data_paths([tmp_path], split="train")
    assert train == [tmp_path / "hh_harmless/train.jsonl.gz", tmp_path / "llmbar/train.jsonl.gz"]
    test = resolve_data_paths([tmp_path], split="test")
    assert [p.relative_to(tmp_path).as_posix() for p in test] == [
        f"{d}/{s}.jsonl.gz" for d in ("hh_harmless", "llmbar") for s in ("dev", "eval", "test", "validation")
    ]
    assert len(resolve_data_paths([tmp_path])) == 10
    # An explicit file is taken whatever the split; giving it twice does not duplicate it.
    explicit = tmp_path / "llmbar/dev.jsonl.gz"
    assert resolve_data_paths([explicit, explicit], split="train") == [explicit]
    pairs, _ = load_pairs([tmp_path], split="train")
    assert [p.id for p in pairs] == ["hh_harmless-train", "llmbar-train"]


def test_resolve_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope: no such file or folder"):
        resolve_data_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="empty: no data files"):
        resolve_data_paths([tmp_path / "empty"])
    write_lines(tmp_path / "only" / "test.jsonl", dumps([rec(1)]))
    with pytest.raises(DataError, match="for split 'train'"):
        resolve_data_paths([tmp_path / "only"], split="train")
