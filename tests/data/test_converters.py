"""Converters on small hand-written fixtures in each dataset's raw public format."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from moerm.data.converters import CONVERTERS, ConvertReport, MissingInputError, Pair, Skip, convert
from moerm.data.schema import validate_record

FIX = Path(__file__).parent / "fixtures"


def read_out(path: Path) -> list[dict[str, Any]]:
    """Output records, each re-validated with the schema line by line."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for line in f]
    for i, rec in enumerate(recs, start=1):
        assert validate_record(rec, path.name, i).to_dict() == rec
    return recs


def triples(recs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in recs]


def expected_id(domain: str, prompt: str, chosen: str, rejected: str) -> str:
    return f"{domain}-{hashlib.sha1((prompt + chosen + rejected).encode()).hexdigest()[:16]}"


def test_registry_names() -> None:
    assert set(CONVERTERS) == {"hh", "shp", "hellaswag", "dahoas", "oasst"}


def test_hh(tmp_path: Path) -> None:
    out = tmp_path / "hh.jsonl"
    report = convert("hh", FIX / "hh.jsonl", out)
    assert (report.n_in, report.n_out) == (4, 2)
    assert report.skipped == [
        "hh.jsonl:3: chosen and rejected transcripts differ before the final Assistant turn",
        "hh.jsonl:4: field 'rejected': chosen and rejected are identical (up to whitespace)",
    ]
    recs = read_out(out)
    assert triples(recs) == [
        ("Human: What is the capital of France?", "The capital of France is Paris.", "I don't know."),
        (
            "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?",
            "2+2 is 4.",
            "It is 5.",
        ),
    ]
    assert all(r["domain"] == "hh" for r in recs)
    assert recs[0]["id"] == expected_id("hh", *triples(recs)[0])


def test_hh_gzip_in_and_out_and_custom_domain(tmp_path: Path) -> None:
    src = tmp_path / "train.jsonl.gz"
    with open(FIX / "hh.jsonl", "rb") as f, gzip.open(src, "wb") as g:
        shutil.copyfileobj(f, g)
    out = tmp_path / "sub" / "hh.jsonl.gz"
    report = convert("hh", src, out, domain="chat")
    assert (report.n_in, report.n_out, len(report.skipped)) == (4, 2, 2)
    assert report.skipped[0].startswith("train.jsonl.gz:3: ")
    recs = read_out(out)
    assert [r["domain"] for r in recs] == ["chat", "chat"]
    assert recs[0]["id"].startswith("chat-")
    assert [p.name for p in out.parent.iterdir()] == ["hh.jsonl.gz"]  # no temp file left behind


def test_shp(tmp_path: Path) -> None:
    out = tmp_path / "shp.jsonl"
    report = convert("shp", FIX / "shp.jsonl", out)
    assert (report.n_in, report.n_out) == (4, 3)
    assert report.skipped == ["shp.jsonl:4: no 'labels' and tied scores (7 = 7)"]
    recs = read_out(out)
    assert triples(recs) == [
        ("How do I keep pasta from sticking?", "Stir it in the first minute.", "Add oil."),  # labels=1
        ("Can my landlord enter without notice?", "Usually they must give 24 hours notice.", "Yes, always."),  # labels=0
        ("Why is the sky blue?", "Rayleigh scattering.", "Because it reflects the ocean."),  # scores only
    ]
    assert [r["subset"] for r in recs] == ["askculinary", "legaladvice", "askscience"]
    assert all("margin" not in r and r["domain"] == "shp" for r in recs)


def test_hellaswag_all_negatives(tmp_path: Path) -> None:
    out = tmp_path / "hs.jsonl"
    report = convert("hellaswag", FIX / "hellaswag.jsonl", out)
    assert (report.n_in, report.n_out) == (3, 6)
    assert report.skipped == ["hellaswag.jsonl:3: no gold label (unlabeled, e.g. the test split)"]
    recs = read_out(out)
    p1 = (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, "
        "and a woman wearing winter clothes smiles. then"
    )
    gold1 = ", the man continues removing the snow on his car."
    assert [t[:2] for t in triples(recs)[:3]] == [(p1, gold1)] * 3
    assert recs[0]["rejected"] == ", the man adds wax to the windshield and cuts it."
    # ctx_a + ctx_b only, string label
    p2 = "Baking cookies: A woman mixes flour and sugar in a bowl. she"
    assert triples(recs)[3:] == [
        (p2, "adds butter and stirs.", "throws the bowl away."),
        (p2, "adds butter and stirs.", "paints the wall."),
        (p2, "adds butter and stirs.", "goes swimming."),
    ]


def test_hellaswag_one_negative_is_deterministic(tmp_path: Path) -> None:
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    report = convert("hellaswag", FIX / "hellaswag.jsonl", out1, all_negatives=False, seed=3)
    convert("hellaswag", FIX / "hellaswag.jsonl", out2, all_negatives=False, seed=3)
    assert (report.n_in, report.n_out, len(report.skipped)) == (3, 2, 1)
    recs = read_out(out1)
    assert recs == read_out(out2)
    endings1 = json.loads((FIX / "hellaswag.jsonl").read_text().splitlines()[0])["endings"]
    assert recs[0]["rejected"] == endings1[random.Random(3 ^ 4).choice([0, 1, 2])]
    assert recs[0]["chosen"] == endings1[3]


def test_dahoas_json_list(tmp_path: Path) -> None:
    out = tmp_path / "d.jsonl"
    report = convert("dahoas", FIX / "dahoas.json", out)
    assert (report.n_in, report.n_out) == (3, 2)
    assert report.skipped == ["dahoas.json:3: field 'rejected': chosen and rejected are identical (up to whitespace)"]
    assert triples(read_out(out)) == [
        ("Human: What is a good name for a cat?\nAssistant:", " Whiskers is a classic.", " Car."),
        ("Human: How many legs does a spider have?\nAssistant:", " Eight.", " Six."),
    ]


def test_oasst(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    report = convert("oasst", FIX / "oasst.trees.jsonl", out)
    assert (report.n_in, report.n_out) == (2, 4)
    assert report.skipped == [
        "oasst.trees.jsonl:2: no prompter message with >= 2 ranked, non-deleted assistant replies in lang 'en'"
    ]
    recs = read_out(out)
    root = "Human: What is Python?"
    deep = "Human: What is Python?\n\nAssistant: A programming language.\n\nHuman: Who created it?"
    assert triples(recs)[0] == (root, "A programming language.", "A snake.")  # deleted and unranked left out
    assert set(triples(recs)[1:]) == {
        (deep, "Guido van Rossum, in 1991.", "Guido van Rossum."),
        (deep, "Guido van Rossum, in 1991.", "Nobody knows."),
        (deep, "Guido van Rossum.", "Nobody knows."),
    }
    # nothing from the subtree under the deleted reply
    assert not any("Really?" in r["prompt"] for r in recs)


def test_oasst_any_lang(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    report = convert("oasst", FIX / "oasst.trees.jsonl", out, lang=None)
    assert (report.n_in, report.n_out) == (2, 7)
    assert report.skipped[0].endswith("non-deleted assistant replies")
    german = [r for r in read_out(out) if "erfunden" in r["rejected"]]
    assert len(german) == 3 and all(r["chosen"] != r["rejected"] for r in german)


def test_bad_rows_are_counted(tmp_path: Path) -> None:
    src = tmp_path / "raw.jsonl"
    src.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
        "\n"  # blank line: not a row
        "{not json\n"
        '[1, 2]\n'
        '{"prompt": "p", "chosen": 3, "rejected": "b"}\n'
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    )
    report = convert("dahoas", src, tmp_path / "o.jsonl")
    assert (report.n_in, report.n_out) == (5, 1)
    assert [s.split(": ", 1)[0] for s in report.skipped] == ["raw.jsonl:3", "raw.jsonl:4", "raw.jsonl:5", "raw.jsonl:6"]
    assert report.skipped[1] == "raw.jsonl:4: expected a JSON object, got list"
    assert report.skipped[2] == "raw.jsonl:5: field 'chosen': expected a string, got int"
    assert "duplicate pair" in report.skipped[3]


def test_converter_items_carry_lines() -> None:
    items = list(CONVERTERS["hh"](FIX / "hh.jsonl", domain="hh"))
    assert [type(i) for i in items] == [Pair, Pair, Skip, Pair]  # identical replies fail later, in validation
    assert [i.line for i in items] == [1, 2, 3, 4]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known formats: dahoas, hellaswag, hh, oasst, shp"):
        convert("nope", FIX / "hh.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="missing.jsonl") as info:
        convert("hh", tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, MissingInputError)
    assert not (tmp_path / "o.jsonl").exists()


def test_summary() -> None:
    assert ConvertReport(3, 3, []).summary() == "converted 3 rows into 3 pairs"
    r = ConvertReport(10, 7, [f"f:{i}: bad" for i in range(3)])
    assert r.summary(max_reasons=2) == "converted 10 rows into 7 pairs; 3 skipped: f:0: bad; f:1: bad; ... and 1 more"
