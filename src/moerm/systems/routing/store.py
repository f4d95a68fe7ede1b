"""Where routers live on disk, written once for every routed system: the safe names of domains, the prompts a router
was trained on (kept so `add-domain` retrains it alone), and `RouterStore`, which owns the versioned router files and
the index switch.

Version 0 of a router sits at the original names; each `add-domain` writes version v at new names, then the system's
index (naming the version in use) is replaced atomically, last, then the old version's files are removed. A kill
before the index leaves the old router and the old index whole; a second add-domain clears the leftovers and runs
again.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from moerm.data.schema import PreferencePair
from moerm.errors import UserError
from moerm.atomic import atomic_path, atomic_write_text

ROUTER_PROMPTS = "router_prompts.jsonl.gz"


def safe_name(name: str, allowed: str = "A-Za-z0-9_.-", sep: str = "-", reserved: frozenset[str] = frozenset()) -> str:
    """A file/module-safe name for a domain: the name itself when it only holds `allowed` characters (and is not
    `reserved`), else a sanitised name plus a short hash, so two names never collide."""
    safe = re.sub(f"[^{allowed}]", "_", name)[:60]
    if safe == name and name and name not in reserved:
        return safe
    return f"{safe or 'd'}{sep}{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def domain_dir(domain: str) -> str:
    """A folder name for a domain (RODOS's RMs, run components)."""
    return safe_name(domain)


def router_examples(pairs: Sequence[PreferencePair], cap_per_domain: int) -> list[tuple[str, str]]:
    """Distinct (prompt, domain) examples, at most `cap_per_domain` per domain, in first-seen order."""
    seen: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    out = []
    for p in pairs:
        key = (p.prompt, p.domain)
        if key in seen or counts.get(p.domain, 0) >= cap_per_domain:
            continue
        seen.add(key)
        counts[p.domain] = counts.get(p.domain, 0) + 1
        out.append(key)
    return out


def require_routes(routes: Sequence[str], system: str, what: str = "domains") -> None:
    """A router needs at least two classes to choose between: one domain is an error, not a 1-class router."""
    if len(set(routes)) < 2:
        raise UserError(f"{system} routes between {what} and needs at least two; the training data has "
                        f"{len(set(routes))} ({', '.join(sorted(set(routes))) or 'none'}). Add another domain's data, "
                        "or train a baseline")


def new_domain_of(pairs: Sequence[PreferencePair], existing: Sequence[str]) -> str:
    """The one domain `add-domain` was given; an error when the pairs hold several, or a domain already served."""
    domains = {p.domain for p in pairs}
    if len(domains) != 1:
        raise UserError(f"add-domain takes the pairs of one new domain; got {sorted(domains)}")
    (domain,) = domains
    if domain in existing:
        raise UserError(f"domain {domain!r} already has a reward model; choose a new domain name")
    return domain


def save_router_examples(examples: Sequence[tuple[str, str]], path: Path) -> None:
    with atomic_path(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
        for prompt, domain in examples:
            f.write(json.dumps({"prompt": prompt, "domain": domain}) + "\n")


def load_router_examples(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(r["prompt"], r["domain"]) for r in map(json.loads, f)]


@dataclass(frozen=True)
class RouterPaths:
    """One router version's files under a model folder."""

    dir: Path  # the router's own folder (its backbone or adapter; the OOD detector)
    head: Path  # its classifier's weights
    prompts: Path  # the (prompt, domain) examples it was trained on
    calibration: Path  # each route's map onto the common reward scale (`systems.calibration`), versioned with it

    def files(self) -> list[Path]:
        return [self.dir, self.head, self.prompts, self.calibration]


@dataclass(frozen=True)
class RouterLayout:
    """Where a system keeps its router versions, relative to the model folder. `dir_parent`: the folder that holds the
    router folder ("" for the model folder: RODOS, DMoERM; "adapters": ARLISS, whose router is an adapter of the
    shared base); `head_parent`: None keeps the classifier inside the router folder (classifier.safetensors), else
    the folder of `router[-vN].safetensors` (ARLISS: "heads")."""

    dir_parent: str = ""
    head_parent: str | None = None

    def paths(self, root: Path, version: int) -> RouterPaths:
        sfx = "" if version == 0 else f"-v{version}"
        folder = root / self.dir_parent / f"router{sfx}" if self.dir_parent else root / f"router{sfx}"
        if self.head_parent is None:
            head, calibration = folder / "classifier.safetensors", folder / "calibration.json"
        else:
            head = root / self.head_parent / f"router{sfx}.safetensors"
            calibration = root / self.head_parent / f"router{sfx}.calibration.json"
        prompts = root / (ROUTER_PROMPTS if version == 0 else f"router_prompts{sfx}.jsonl.gz")
        return RouterPaths(folder, head, prompts, calibration)


class RouterStore:
    """A model folder's versioned router files and the index that switches between them (`index_file`, a JSON object
    whose `router_version` names the version in use; a missing key is version 0)."""

    def __init__(self, root: Path, index_file: str, layout: RouterLayout = RouterLayout()):
        self.root, self.index_path, self.layout = Path(root), Path(root) / index_file, layout

    def paths(self, version: int) -> RouterPaths:
        return self.layout.paths(self.root, version)

    def relative(self, version: int) -> dict[str, str]:
        """The version's files relative to the model folder (for `component_files`)."""
        paths = self.layout.paths(Path(), version)
        return {"dir": str(paths.dir), "head": str(paths.head), "prompts": str(paths.prompts),
                "calibration": str(paths.calibration)}

    def read_index(self) -> dict[str, Any]:
        return json.loads(self.index_path.read_text())

    def version(self) -> int:
        return int(self.read_index().get("router_version", 0))

    def remove(self, version: int) -> None:
        """Delete one router version's files (a killed add-domain's leftovers, or a retired version)."""
        for target in self.paths(version).files():
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()

    def write(self, version: int, save_router: Callable[[RouterPaths], None], examples: Sequence[tuple[str, str]],
              index: dict[str, Any]) -> None:
        """Write router `version` (clearing any leftovers at its names first), then the index naming it, last."""
        paths = self.paths(version)
        self.remove(version)
        save_router(paths)
        save_router_examples(examples, paths.prompts)
        atomic_write_text(self.index_path, json.dumps({**index, "router_version": version}, indent=2))

    def swap(self, old: int, save_router: Callable[[RouterPaths], None], examples: Sequence[tuple[str, str]],
             index: dict[str, Any], before_retire: Callable[[], None] = lambda: None) -> int:
        """`add-domain`'s switch: write version old + 1 and its index, run `before_retire` (e.g. the system file),
        then remove version `old`. Returns the new version."""
        new = old + 1
        self.write(new, save_router, examples, index)
        before_retire()
        self.remove(old)
        return new
