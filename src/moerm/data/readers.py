"""Read preference pairs from JSON Lines, JSON, CSV, Parquet and Hugging Face `datasets`, and write JSON Lines."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moerm.atomic import atomic_path
from moerm.data.schema import InvalidRecord, PreferencePair, validate_record
from moerm.data.trl import from_trl, is_trl_record
from moerm.errors import UserError

DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")
SPLIT_PREFIXES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "test": ("test", "eval", "dev", "valid"),
}
# Files written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`; their folder is one data source.
_HF_MARKERS: tuple[str, ...] = ("dataset_info.json", "state.json", "dataset_dict.json")
_ASPECT_FIELDS: tuple[str, ...] = ("aspects_chosen", "aspects_rejected")
_OFFLINE_VARS: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

# The longest line a JSON Lines file may have: a longer one is an invalid record, read past in chunks, so a small
# .jsonl.gz that inflates to one huge line never takes more memory than this.
MAX_LINE_BYTES = 16 * 2**20

# A reader yields (line, record) or (line, InvalidRecord) so that skip mode can go on after a bad line.
_Item = tuple[int, Any]


class DataError(UserError):
    """A data source that cannot be read at all (missing path, corrupt file, unreachable Hub)."""


@dataclass
class ReadReport:
    """What `load_pairs` read: counts plus every invalid record, so nothing is dropped silently."""

    n_read: int = 0
    n_valid: int = 0
    n_invalid: int = 0
    invalid: list[InvalidRecord] = field(default_factory=list)

    def summary(self, max_reasons: int = 5) -> str:
        """Counts and the first `max_reasons` invalid records, one per line."""
        lines = [f"{self.n_read} records read: {self.n_valid} valid, {self.n_invalid} invalid"]
        lines += [f"  {err}" for err in self.invalid[:max_reasons]]
        if self.n_invalid > max_reasons:
            lines.append(f"  ... and {self.n_invalid - max_reasons} more")
        return "\n".join(lines)


# ---------------------------------------------------------------- path resolution


def _data_suffix(path: Path) -> str | None:
    """The data suffix of `path` (longest match, so `.jsonl.gz` wins over `.gz`), or None."""
    name = path.name.lower()
    matches = [s for s in DATA_SUFFIXES if name.endswith(s)]
    return max(matches, key=len) if matches else None


def _stem(path: Path) -> str:
    """File name without its data suffix: `train.jsonl.gz` -> `train`."""
    suffix = _data_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_MARKERS)


def _hf_split_names(path: Path) -> list[str]:
    """Split names of a saved DatasetDict (from dataset_dict.json), or the folder name of a single Dataset."""
    try:
        return list(json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return [path.name]


def _matches_split(name: str, split: str | None) -> bool:
    if split is None:
        return True
    if split not in SPLIT_PREFIXES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(SPLIT_PREFIXES)}")
    return name.lower().startswith(SPLIT_PREFIXES[split])


def resolve_data_paths(paths: Sequence[str | Path], split: str | None = None) -> list[Path]:
    """Expand files and folders into data sources (files, or `save_to_disk` folders), sorted per argument."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            if path.is_symlink():
                raise DataError(f"{path}: a symbolic link to nothing, or a loop of links")
            raise DataError(f"{path}: no such file or folder")
        if path.is_file() or _is_hf_folder(path):
            found = [path]  # explicit files are always taken, whatever the split
        else:
            found = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                here = Path(root)
                for d in list(dirs):
                    # A saved HF dataset is one unit: take it (if its name fits the split) and do not descend.
                    if _is_hf_folder(here / d):
                        dirs.remove(d)
                        if any(_matches_split(n, split) for n in _hf_split_names(here / d)):
                            found.append(here / d)
                found += [here / f for f in files if _data_suffix(here / f) and _matches_split(f, split)]
            found.sort()
            if not found:
                which = f" for split '{split}'" if split else ""
                raise DataError(f"{path}: no data files{which} ({', '.join(DATA_SUFFIXES)}) in this folder")
        for p in found:
            try:
                key = p.resolve()
            except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a loop of symbolic links
                raise DataError(f"{p}: a loop of symbolic links") from None
            if key not in seen:  # the same file given twice would only yield duplicate ids
                seen.add(key)
                out.append(p)
    return out


# ---------------------------------------------------------------- readers


def _decode(data: bytes, source: str, line: int | None = None) -> str:
    """UTF-8 decode; on failure name the line (computed from the byte offset when not given)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        where = line if line is not None else data[: e.start].count(b"\n") + 1
        raise InvalidRecord(source, where, None, f"invalid UTF-8 (byte {e.start}: {e.reason})") from None


def read_lines(f: Any, limit: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each line of a binary file; None in place of a line longer than `limit` bytes
    (default MAX_LINE_BYTES), which is skipped without ever being held whole."""
    limit = MAX_LINE_BYTES if limit is None else limit
    n = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        n += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while True:  # the rest of the line, a chunk at a time
                chunk = f.readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield n, None
            continue
        yield n, raw


def too_long(limit: int | None = None) -> str:
    return f"line longer than {MAX_LINE_BYTES if limit is None else limit} bytes, the most one record may take"


def json_error(e: ValueError | RecursionError) -> str:
    """Why `json.loads` refused a text, in a few words (RecursionError: nested too deeply; ValueError: e.g. an
    integer past Python's 4300 digits)."""
    if isinstance(e, RecursionError):
        return "invalid JSON (nested too deeply)"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg}, column {e.colno})"
    return f"invalid JSON ({str(e).split(';')[0]})"


def _gzip_error(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read gzip file, it is corrupt or truncated ({type(e).__name__}: {e})")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in `.gz`."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _gzip_error(path, e) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None


def _iter_jsonl(path: Path) -> Iterator[_Item]:
    source = str(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in read_lines(f):
                if raw is None:
                    yield line_no, InvalidRecord(source, line_no, None, too_long())
                    continue
                if not raw.strip():
                    continue  # blank lines are layout, not records
                text = ""
                try:
                    text = _decode(raw, source, line_no)
                    value = json.loads(text)
                    if isinstance(value, list):
                        raise InvalidRecord(source, line_no, None, "a JSON array on one line: a .jsonl file holds one "
                                            "object per line (a file that is one JSON list should be named .json)")
                    yield line_no, value
                except InvalidRecord as e:
                    yield line_no, e
                except json.JSONDecodeError as e:
                    hint = (" (this looks like a JSON array: a file that is one JSON list should be named .json)"
                            if line_no == 1 and text.lstrip().startswith("[") else "")
                    yield line_no, InvalidRecord(source, line_no, None, f"{json_error(e)}{hint}")
                except (ValueError, RecursionError) as e:
                    yield line_no, InvalidRecord(source, line_no, None, json_error(e))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _gzip_error(path, e) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from None


def _iter_json(path: Path) -> Iterator[_Item]:
    source = str(path)
    try:
        data = json.loads(_decode(_read_bytes(path), source))
    except InvalidRecord as e:
        raise DataError(str(e)) from None  # the whole file is unusable, so this is not a per-record error
    except json.JSONDecodeError as e:
        hint = (" (this looks like JSON Lines, one object per line: name the file .jsonl)"
                if e.msg == "Extra data" else "")
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno}){hint}") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: {json_error(e)}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of records or {{"data": [...]}}, got {type(data).__name__}')
    yield from enumerate(data, start=1)


def _parse_aspects(rec: dict[str, Any], source: str, line: int) -> None:
    """Aspects stored as JSON strings (CSV, Parquet) become dicts; unparsable ones raise InvalidRecord."""
    for name in _ASPECT_FIELDS:
        value = rec.get(name)
        if isinstance(value, str):
            try:
                rec[name] = json.loads(value)
            except (ValueError, RecursionError):
                raise InvalidRecord(source, line, name, f"expected a JSON object {{aspect: number}}, got {value!r}")
        elif isinstance(rec.get(name), dict):
            # Arrow struct columns fill aspects a row lacks with None; those were never there.
            rec[name] = {k: v for k, v in rec[name].items() if v is not None}


def _iter_csv(path: Path) -> Iterator[_Item]:
    source = str(path)
    try:
        text = _decode(_read_bytes(path), source)
    except InvalidRecord as e:
        raise DataError(str(e)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = reader.line_num + 2  # the header is line 1
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:  # a field past csv's size limit, a NUL byte: the file cannot be read on from here
            raise DataError(f"{path}:{start}: cannot read CSV ({e}); long texts and binary data belong "
                            "in JSON Lines (.jsonl)") from None
        line, start = start, reader.line_num + 1  # quoted fields may span lines; report the first
        rec: dict[str, Any] = dict(row)
        if None in rec:
            yield line, InvalidRecord(source, line, None, "more cells than header columns")
            continue
        # An empty cell means "not given" for optional and defaultable fields; texts keep "" so "empty text" shows.
        for name in ("id", "domain", "subset", "margin", *_ASPECT_FIELDS):
            if rec.get(name) == "":
                rec[name] = None
        if isinstance(rec.get("margin"), str):
            try:
                rec["margin"] = float(rec["margin"])
            except ValueError:
                pass  # left as a string: validate_record reports the wrong type
        try:
            _parse_aspects(rec, source, line)
        except InvalidRecord as e:
            yield line, e
            continue
        yield line, rec


def _iter_parquet(path: Path) -> Iterator[_Item]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for bad files
        raise DataError(f"{path}: cannot read Parquet file ({type(e).__name__}: {e})") from None
    yield from _iter_rows(rows, str(path))


def _iter_rows(rows: Iterable[dict[str, Any]], source: str) -> Iterator[_Item]:
    """Rows of a table (Parquet, `datasets`): line = row index + 1; aspect strings/structs normalised."""
    for line, row in enumerate(rows, start=1):
        rec = dict(row)
        try:
            _parse_aspects(rec, source, line)
        except InvalidRecord as e:
            yield line, e
            continue
        yield line, rec


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the `datasets` package: pip install moerm[hf]") from None
    return datasets


def _hf_splits(obj: Any, split: str | None, source: str) -> list[tuple[str, Any]]:
    """(name, Dataset) pairs from a Dataset or DatasetDict, keeping only splits that fit `split`."""
    if not hasattr(obj, "keys"):  # a single Dataset
        return [("", obj)]
    names = sorted(k for k in obj.keys() if _matches_split(k, split))
    if not names:
        raise DataError(f"{source}: no split matching '{split}' (has {', '.join(sorted(obj.keys()))})")
    return [(n, obj[n]) for n in names]


def _iter_hf_disk(path: Path, split: str | None) -> Iterator[tuple[str, str, Iterator[_Item]]]:
    datasets = _import_datasets()
    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ... for broken folders
        raise DataError(f"{path}: cannot load saved Hugging Face dataset ({type(e).__name__}: {e})") from None
    for name, ds in _hf_splits(obj, split, str(path)):
        source = f"{path}/{name}" if name else str(path)
        yield source, name or path.name, _iter_rows(ds, source)


@contextlib.contextmanager
def _offline_from_env(datasets: Any) -> Iterator[None]:
    """Honour HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set after import (the libraries read them only at import).

    Without this, a late `HF_HUB_OFFLINE=1` is ignored and an offline machine retries the Hub for ~30 s.
    """
    import huggingface_hub.constants as hub_constants

    wanted = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in _OFFLINE_VARS)
    if not wanted or datasets.config.HF_HUB_OFFLINE:
        yield
        return
    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _iter_hf_hub(spec: str, split: str | None) -> Iterator[tuple[str, str, Iterator[_Item]]]:
    """`hf:name` or `hf:name:split` from the Hugging Face Hub (or its local cache)."""
    name, _, hub_split = spec[len("hf:") :].partition(":")
    if not name:
        raise DataError(f"{spec}: expected hf:<dataset name>[:<split>]")
    datasets = _import_datasets()
    try:
        with _offline_from_env(datasets):
            obj = datasets.load_dataset(name, split=hub_split or None)
    except Exception as e:
        # Offline mode, connection errors and DatasetNotFoundError all land here; one clear line, no traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"hf:{name}: could not load this dataset: the Hugging Face Hub could not be reached or has no such "
            f"dataset ({type(e).__name__}: {first[:200]}). Download it where the Hub is reachable "
            f"(Dataset.save_to_disk) and pass the local folder instead."
        ) from None
    for split_name, ds in _hf_splits(obj, None if hub_split else split, spec):
        source = f"hf:{name}:{hub_split or split_name}" if (hub_split or split_name) else f"hf:{name}"
        stem = f"{name.rsplit('/', 1)[-1]}-{hub_split or split_name}".rstrip("-")
        yield source, stem, _iter_rows(ds, source)


def _sources(path: Path, split: str | None) -> Iterator[tuple[str, str, Iterator[_Item]]]:
    """(source name, id stem, items) for one resolved path."""
    if path.is_dir():
        yield from _iter_hf_disk(path, split)
        return
    suffix = _data_suffix(path)
    readers = {".jsonl": _iter_jsonl, ".jsonl.gz": _iter_jsonl, ".json": _iter_json, ".json.gz": _iter_json,
               ".csv": _iter_csv, ".parquet": _iter_parquet}
    if suffix is None:
        raise DataError(f"{path}: unknown data format; expected one of {', '.join(DATA_SUFFIXES)}")
    yield str(path), _stem(path), readers[suffix](path)


# ---------------------------------------------------------------- loading


def _prepare(rec: Any, column_map: dict[str, str] | None, default_domain: str | None, stem: str, line: int) -> Any:
    """Rename columns and fill the defaults for `id` and `domain`."""
    if not isinstance(rec, dict):
        return rec  # validate_record reports it
    rec = dict(rec)
    for ours, theirs in (column_map or {}).items():
        if theirs in rec:
            rec[ours] = rec.pop(theirs)
    if is_trl_record(rec):  # TRL's layouts (moerm.data.trl); without a domain: --domain, else the file's name
        rec = from_trl(rec)
        if rec.get("domain") is None:
            rec["domain"] = default_domain if default_domain is not None else stem
    if rec.get("id") is None:
        rec["id"] = f"{stem}-{line}"
    if rec.get("domain") is None and default_domain is not None:
        rec["domain"] = default_domain
    return rec


def load_pairs(
    paths: Sequence[str | Path],
    split: str | None = None,
    on_invalid: Literal["error", "skip"] = "error",
    column_map: dict[str, str] | None = None,
    default_domain: str | None = None,
) -> tuple[list[PreferencePair], ReadReport]:
    """Load and validate pairs from files, folders, saved `datasets` folders and `hf:` names.

    In "error" mode the first invalid record raises InvalidRecord; in "skip" mode it is counted in the report.
    """
    if on_invalid not in ("error", "skip"):
        raise UserError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    report = ReadReport()
    pairs: list[PreferencePair] = []
    first_seen: dict[str, str] = {}
    for raw in paths:
        if isinstance(raw, str) and raw.startswith("hf:"):
            groups: Iterable[tuple[str, str, Iterator[_Item]]] = _iter_hf_hub(raw, split)
        else:
            groups = (g for p in resolve_data_paths([raw], split) for g in _sources(p, split))
        for source, stem, items in groups:
            for line, item in items:
                report.n_read += 1
                try:
                    if isinstance(item, InvalidRecord):
                        raise item
                    pair = validate_record(_prepare(item, column_map, default_domain, stem, line), source, line)
                    if pair.id in first_seen:
                        raise InvalidRecord(source, line, "id", f"duplicate id, first seen at {first_seen[pair.id]}")
                    first_seen[pair.id] = f"{source}:{line}"
                except InvalidRecord as e:
                    if on_invalid == "error":
                        raise
                    report.n_invalid += 1
                    report.invalid.append(e)
                    continue
                pairs.append(pair)
                report.n_valid += 1
    return pairs, report


def write_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSON Lines (gzip'd when the name ends in `.gz`), atomically (`moerm.atomic`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        # filename="" and mtime=0 keep the gzip header free of the temp name and time: same data, same bytes.
        out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz") else raw
        with out:
            for pair in pairs:
                out.write(json.dumps(pair.to_dict(), ensure_ascii=False).encode("utf-8") + b"\n")
    return path
