"""Best-of-N against human gold in `moerm bench` (`moerm.eval.bon`), when the held-out pairs hold human-scored domains.

After the grid, the candidate sets are rebuilt from the bench's shared held-out sample (so with a per-domain cap they
are smaller than in the full data: the report says so), every finished cell scores them once, and the rewards are
kept in the cell's folder (`bon_rewards.json`, keyed by a hash of the candidates) so a rerun scores nothing again.
A system whose bench plan restricted its domains gets curves on those domains only. Seeds are averaged per prompt
(the interval is over prompts). Nothing here names a system.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console

from moerm.bench.presets import BenchConfig
from moerm.eval.bon import DomainSets, bon_markdown, bon_results, build_candidate_sets, plot_bon, score_candidates
from moerm.atomic import atomic_write_text

REWARDS_FILE = "bon_rewards.json"
PLOT = "best_of_n"


def candidates_key(domains: Mapping[str, DomainSets]) -> str:
    """A hash of exactly the candidates scored (domains, prompts, response texts, order)."""
    h = hashlib.sha256()
    for d, ds in domains.items():
        for cs in ds.sets:
            h.update(json.dumps([d, cs.prompt, cs.responses], ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def _cell_rewards(cfg: BenchConfig, cell_dir: Path, domains: Mapping[str, DomainSets]) -> dict[str, Any]:
    """The cell's rewards of every candidate of `domains`: from its cache file, else scored now and cached."""
    from moerm.systems.base import find_model_dir, load_system

    key = candidates_key(domains)
    path = cell_dir / REWARDS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["rewards"]
    system = load_system(find_model_dir(cell_dir), device=cfg.resolved_device())
    rewards = score_candidates(system, domains, batch_size=cfg.eval_batch_size)
    atomic_write_text(path, json.dumps({"key": key, "rewards": rewards}))
    return rewards


def bench_best_of_n(cfg: BenchConfig, test: Sequence[Any], cell_dirs: Mapping[str, Sequence[Path]],
                    plans: Mapping[str, dict[str, Any]], console: Console | None = None) -> dict[str, Any] | None:
    """Best-of-N results of every system on the human-scored domains of the held-out pairs `test`; None when none.

    `cell_dirs`: system -> its finished cells' folders (seed order); `plans`: the systems' bench plan records.
    """
    domains, skipped = build_candidate_sets(test)
    if not domains:
        return None
    if console is not None:
        console.print(f"best-of-N: {sum(len(cs.responses) for ds in domains.values() for cs in ds.sets)} candidates "
                      f"of {len(domains)} human-scored domain(s), every finished cell", highlight=False)
    rewards: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for system, dirs in cell_dirs.items():
        plan = plans.get(system)
        own = set(plan.get("domains") or []) if plan and plan.get("status") == "ok" else set(domains)
        sub = {d: ds for d, ds in domains.items() if d in own}
        if not sub or not dirs:
            continue
        runs = []
        for d in dirs:
            try:
                runs.append(_cell_rewards(cfg, Path(d), sub))
            except Exception as e:  # one broken cell must not cost the others' curves; the report says which
                errors[f"{system}/{Path(d).name}"] = f"{type(e).__name__}: {e}"
                atomic_write_text(Path(d) / "bon_error.txt", traceback.format_exc())
        if runs:
            rewards[system] = runs
            meta[system] = {"system": system, "display": system, "runs": len(runs)}
    res = bon_results(domains, rewards, skipped, meta)
    cap = cfg.max_eval_pairs_per_domain
    res["note"] = ("Candidate sets are rebuilt from the bench's held-out sample"
                   + (f" (at most {cap} pairs per domain: sets can be smaller than in the full data)" if cap else "")
                   + "; each system's curve is the mean over its seeds per prompt.")
    res["errors"] = errors
    return res


def best_of_n_markdown(res: dict[str, Any]) -> str:
    """The report's Best-of-N section body."""
    bon = res["best_of_n"]
    lines = [bon["note"], "", bon_markdown(bon, heading="####")]
    if bon.get("errors"):
        lines += ["", "Cells that could not be scored (the traceback is in the cell's bon_error.txt):", ""]
        lines += [f"- {k}: {v}" for k, v in bon["errors"].items()]
    lines += ["", f"![{PLOT}](plots/{PLOT}.png)"]
    return "\n".join(lines)


def write_best_of_n_plot(res: dict[str, Any], plots: Path) -> str | None:
    """plots/best_of_n.png when the bench has Best-of-N curves; its path relative to OUT."""
    bon = res.get("best_of_n")
    if not bon or not bon["domains"]:
        return None
    title = (f"Best-of-N against human gold: bench {res['name']}, held-out sample; "
             + ", ".join(f"{d} {r['prompts']} prompts" for d, r in bon["domains"].items()))
    plot_bon(bon, plots / f"{PLOT}.png", title)
    return f"plots/{PLOT}.png"
