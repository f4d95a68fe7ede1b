"""Converters from the raw public formats of preference datasets to our JSON Lines records.

Each converter reads one raw file and yields, row by row, either a `Pair` (a record dict meant for
`validate_record`) or a `Skip` (why a row, or one pair of a row, could not be converted). Every input
row yields at least one item, so nothing is dropped silently; `convert` validates, writes and counts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moerm.atomic import atomic_path
from moerm.data.schema import validate_record
from moerm.errors import UserError

Record = dict[str, Any]


@dataclass(frozen=True)
class Pair:
    """A converted record and the input row (1-based line, or item index for a .json list) it came from."""

    line: int
    record: Record


@dataclass(frozen=True)
class Skip:
    """An input row (or one pair of it) that could not be converted, and why."""

    line: int
    reason: str


ConvertItem = Pair | Skip
Converter = Callable[..., Iterator[ConvertItem]]


@dataclass
class ConvertReport:
    n_in: int
    n_out: int
    skipped: list[str] = field(default_factory=list)

    def summary(self, max_reasons: int = 5) -> str:
        head = f"converted {self.n_in} rows into {self.n_out} pairs"
        if not self.skipped:
            return head
        # One row can yield several pairs (HellaSwag, OASST), so skips are counted per item, not per row.
        shown = "; ".join(self.skipped[:max_reasons])
        more = len(self.skipped) - max_reasons
        tail = f"; ... and {more} more" if more > 0 else ""
        return f"{head}; {len(self.skipped)} skipped: {shown}{tail}"


class MissingInputError(FileNotFoundError, ValueError):
    """The input file does not exist (a ValueError too, like every other bad argument to `convert`)."""


# ---------------------------------------------------------------------------------------------- reading


def _open_text(path: Path, mode: str = "rt", gz: bool | None = None) -> IO[str]:
    if path.suffix == ".gz" if gz is None else gz:
        return gzip.open(path, mode, encoding="utf-8")  # type: ignore[return-value]
    return open(path, mode, encoding="utf-8")


def _read_rows(path: Path) -> Iterator[tuple[int, Any | Skip]]:
    """(line, parsed row) for JSON Lines, (1-based index, item) for a .json list; bad JSON becomes a Skip."""
    if path.name.endswith((".json", ".json.gz")):
        with _open_text(path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        yield from enumerate(data, start=1)
        return
    with _open_text(path) as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue  # blank lines are not rows
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, Skip(lineno, f"invalid JSON: {e.msg}")


RowResult = Iterable[Record | str]  # a str is a skip reason


def _per_row(path: Path, convert_row: Callable[[dict[str, Any]], RowResult]) -> Iterator[ConvertItem]:
    for line, row in _read_rows(path):
        if isinstance(row, Skip):
            yield row
            continue
        if not isinstance(row, dict):
            yield Skip(line, f"expected a JSON object, got {type(row).__name__}")
            continue
        produced = False
        for out in convert_row(row):
            produced = True
            yield Skip(line, out) if isinstance(out, str) else Pair(line, out)
        if not produced:  # safety net: a row must never vanish without a reason
            yield Skip(line, "row produced no pairs")


def make_record(domain: str, prompt: str, chosen: str, rejected: str, **extra: Any) -> Record:
    digest = hashlib.sha1((prompt + chosen + rejected).encode("utf-8")).hexdigest()[:16]
    rec: Record = {"id": f"{domain}-{digest}", "domain": domain, "prompt": prompt}
    rec.update(chosen=chosen, rejected=rejected)
    rec.update({k: v for k, v in extra.items() if v is not None})
    return rec


def _strings(row: dict[str, Any], *names: str) -> list[str] | str:
    """The named fields as strings, or a skip reason naming the first missing / non-string one."""
    out = []
    for name in names:
        value = row.get(name)
        if not isinstance(value, str):
            why = "missing" if value is None else f"expected a string, got {type(value).__name__}"
            return f"field '{name}': {why}"
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------------- formats

_HH_TURN = "\n\nAssistant:"


def _hh_split(transcript: str) -> tuple[str, str] | None:
    cut = transcript.rfind(_HH_TURN)
    if cut < 0:
        return None
    return transcript[:cut].lstrip(), transcript[cut + len(_HH_TURN) :].strip()


def convert_hh(in_path: Path, domain: str = "hh") -> Iterator[ConvertItem]:
    """Anthropic HH-RLHF: two full transcripts sharing all but the final Assistant reply."""

    def row_fn(row: dict[str, Any]) -> RowResult:
        texts = _strings(row, "chosen", "rejected")
        if isinstance(texts, str):
            return [texts]
        split_c, split_r = _hh_split(texts[0]), _hh_split(texts[1])
        if split_c is None or split_r is None:
            return [f"no '\\n\\nAssistant:' turn in the {'chosen' if split_c is None else 'rejected'} transcript"]
        if split_c[0] != split_r[0]:
            return ["chosen and rejected transcripts differ before the final Assistant turn"]
        return [make_record(domain, split_c[0], split_c[1], split_r[1])]

    return _per_row(in_path, row_fn)


_SHP_SPLITS = ("_train", "_test", "_validation")


def convert_shp(in_path: Path, domain: str = "shp") -> Iterator[ConvertItem]:
    """Stanford SHP: a post and two top-level comments; `labels` (or the scores) says which is preferred.

    margin stays None: SHP's score ratios are upvote ratios (often 2..100+), not a difference on the
    Bradley-Terry logit scale, so using them as a margin would mis-weight the loss.
    """

    def row_fn(row: dict[str, Any]) -> RowResult:
        texts = _strings(row, "history", "human_ref_A", "human_ref_B")
        if isinstance(texts, str):
            return [texts]
        prompt, ref_a, ref_b = texts
        label = row.get("labels")
        if label is None:
            score_a, score_b = row.get("score_A"), row.get("score_B")
            if not isinstance(score_a, (int, float)) or not isinstance(score_b, (int, float)):
                return ["no 'labels' and no numeric score_A/score_B"]
            if score_a == score_b:
                return [f"no 'labels' and tied scores ({score_a} = {score_b})"]
            a_wins = score_a > score_b
        elif label in (0, 1) and not isinstance(label, bool):
            a_wins = label == 1
        else:
            return [f"field 'labels': expected 0 or 1, got {label!r}"]
        subset = row.get("domain")
        if isinstance(subset, str):
            for suffix in _SHP_SPLITS:
                subset = subset.removesuffix(suffix)
        else:
            subset = None
        chosen, rejected = (ref_a, ref_b) if a_wins else (ref_b, ref_a)
        return [make_record(domain, prompt, chosen, rejected, subset=subset)]

    return _per_row(in_path, row_fn)


def convert_hellaswag(
    in_path: Path, domain: str = "hellaswag", all_negatives: bool = True, seed: int = 0
) -> Iterator[ConvertItem]:
    """HellaSwag: the gold ending beats a wrong one; every wrong one (`all_negatives`) or one chosen by seed."""

    def row_fn(row: dict[str, Any]) -> RowResult:
        ctx = row.get("ctx")
        if not isinstance(ctx, str) or not ctx.strip():
            parts = _strings(row, "ctx_a", "ctx_b")
            if isinstance(parts, str):
                return ["no 'ctx' and " + parts]
            ctx = parts[0] + " " + parts[1]
        activity = row.get("activity_label")
        if not isinstance(activity, str):
            return ["field 'activity_label': missing or not a string"]
        endings = row.get("endings")
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            return ["field 'endings': expected a list of at least 2 strings"]
        label = row.get("label")
        if label is None or label == "":
            return ["no gold label (unlabeled, e.g. the test split)"]
        # Raw files have int labels, the Hugging Face copy has them as strings.
        if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.isdigit())):
            return [f"field 'label': not an index: {label!r}"]
        gold = int(label)
        if not 0 <= gold < len(endings):
            return [f"field 'label': {label!r} out of range for {len(endings)} endings"]
        prompt = f"{activity}: {ctx.strip()}"
        wrong = [i for i in range(len(endings)) if i != gold]
        if not all_negatives:
            ind = row.get("ind")
            # Seeded per row so the pick is stable whatever the file order or which rows are skipped.
            if isinstance(ind, int) and not isinstance(ind, bool):
                key = ind
            else:
                key = int(hashlib.sha1(prompt.encode()).hexdigest()[:8], 16)
            wrong = [random.Random(seed ^ key).choice(wrong)]
        return [make_record(domain, prompt, endings[gold], endings[i]) for i in wrong]

    return _per_row(in_path, row_fn)


def convert_dahoas(in_path: Path, domain: str = "dahoas") -> Iterator[ConvertItem]:
    """Dahoas/synthetic-instruct-gptj-pairwise: already prompt / chosen / rejected."""

    def row_fn(row: dict[str, Any]) -> RowResult:
        texts = _strings(row, "prompt", "chosen", "rejected")
        return [texts] if isinstance(texts, str) else [make_record(domain, *texts)]

    return _per_row(in_path, row_fn)


_OASST_ROLES = {"prompter": "Human", "assistant": "Assistant"}


def convert_oasst(in_path: Path, domain: str = "oasst", lang: str | None = "en") -> Iterator[ConvertItem]:
    """OpenAssistant trees: ranked sibling assistant replies to one prompter message give ordered pairs."""

    def walk(node: dict[str, Any], path: list[str]) -> Iterator[Record | str]:
        role, text = node.get("role"), node.get("text")
        if role not in _OASST_ROLES or not isinstance(text, str):
            yield f"message {node.get('message_id', '?')}: bad role {role!r} or text; its subtree is skipped"
            return
        path = [*path, f"{_OASST_ROLES[role]}: {text.strip()}"]
        replies = [r for r in node.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
        if role == "prompter":
            ranked = [
                r
                for r in replies
                if r.get("role") == "assistant"
                and isinstance(r.get("rank"), int)
                and isinstance(r.get("text"), str)
                and (lang is None or r.get("lang") == lang)
            ]
            if len(ranked) >= 2:
                prompt = "\n\n".join(path)
                for a in ranked:
                    for b in ranked:
                        if a["rank"] < b["rank"]:
                            yield make_record(domain, prompt, a["text"].strip(), b["text"].strip())
        # Deleted messages' subtrees are dropped too: a conversation continuing a deleted turn is not one we keep.
        for r in replies:
            yield from walk(r, path)

    def row_fn(row: dict[str, Any]) -> RowResult:
        root = row.get("prompt")
        if not isinstance(root, dict):
            return ["field 'prompt': expected the root message object"]
        out = list(walk(root, []))
        if not any(isinstance(o, dict) for o in out):
            where = f" in lang {lang!r}" if lang is not None else ""
            reasons = [o for o in out if isinstance(o, str)]
            return reasons + [f"no prompter message with >= 2 ranked, non-deleted assistant replies{where}"]
        return out

    return _per_row(in_path, row_fn)


CONVERTERS: dict[str, Converter] = {
    "hh": convert_hh,
    "shp": convert_shp,
    "hellaswag": convert_hellaswag,
    "dahoas": convert_dahoas,
    "oasst": convert_oasst,
}


# ---------------------------------------------------------------------------------------------- driver


def convert(fmt: str, in_path: Path, out_path: Path, domain: str | None = None, **options: Any) -> ConvertReport:
    """Convert one raw file to validated JSON Lines (gzipped if `out_path` ends in .gz), written atomically."""
    if fmt not in CONVERTERS:
        raise UserError(f"unknown format {fmt!r}; known formats: {', '.join(sorted(CONVERTERS))}")
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise MissingInputError(f"input file not found: {in_path}")
    items = CONVERTERS[fmt](in_path, domain=domain or fmt, **options)
    report = ConvertReport(n_in=0, n_out=0)
    source = in_path.name
    seen_ids: set[str] = set()
    last_line: int | None = None
    with atomic_path(out_path) as tmp:
        with _open_text(tmp, "wt", gz=out_path.suffix == ".gz") as f:
            for item in items:
                if item.line != last_line:  # items come in row order and every row yields at least one
                    report.n_in += 1
                    last_line = item.line
                if isinstance(item, Skip):
                    report.skipped.append(f"{source}:{item.line}: {item.reason}")
                    continue
                try:
                    pair = validate_record(item.record, source, item.line)
                except ValueError as e:  # InvalidRecord already reads "file:line: field ...: why"
                    report.skipped.append(str(e))
                    continue
                if pair.id in seen_ids:  # e.g. HH repeats some pairs; duplicate ids would break id lookups
                    report.skipped.append(f"{source}:{item.line}: duplicate pair (id {pair.id} already written)")
                    continue
                seen_ids.add(pair.id)
                f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
                report.n_out += 1
    return report
