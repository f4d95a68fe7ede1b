"""DMoERM against the baseline RM and a mean ensemble of K RMs, trained on the same pairs, evaluated on the same
held-out pairs (the DMoERM paper's comparison), on the aspect-labelled domains.

    .venv/bin/python benchmarks/dmoerm_eval.py --data ../shared/data --train-per-domain 150 --eval-per-domain 100 \
        --out runs/dmoerm-eval

Runs are kept in OUT/<system>; rerunning resumes (finished runs are only re-evaluated). Reported: consistency
(pairwise accuracy against the overall preference) per task, per domain and overall; DMoERM's task-router accuracy;
each capability expert's accuracy on its own aspect labels (held-out pairs, ties dropped); training seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console

from moerm.config import load_config
from moerm.data.readers import load_pairs
from moerm.eval.metrics import evaluate_system
from moerm.runs import cap_per_domain, train_run
from moerm.systems import load_system
from moerm.systems.tasks import load_tasks_file, task_of_domain

ASPECT_DOMAINS = ["summeval", "newsroom", "topical_chat", "d2t_nlg"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="folder holding one folder per domain")
    ap.add_argument("--domains", default=",".join(ASPECT_DOMAINS))
    ap.add_argument("--tasks-file", default="configs/tasks/aspect-domains.yaml")
    ap.add_argument("--train-per-domain", type=int, default=150)
    ap.add_argument("--eval-per-domain", type=int, default=100)
    ap.add_argument("--members", type=int, default=3, help="ensemble size K")
    ap.add_argument("--systems", default="baseline,ensemble,dmoerm")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every system")
    ap.add_argument("--out", default="runs/dmoerm-eval")
    args = ap.parse_args()
    console = Console()
    command = "python benchmarks/dmoerm_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    domains = args.domains.split(",")
    paths = [str(Path(args.data) / d) for d in domains]
    task_of = task_of_domain(load_tasks_file(args.tasks_file))
    test, _ = load_pairs(paths, split="test")
    test = cap_per_domain(test, args.eval_per_domain, seed=0)

    configs = {"baseline": "configs/baseline.yaml", "ensemble": "configs/ensemble.yaml", "dmoerm": "configs/dmoerm.yaml"}
    reports: dict[str, dict[str, Any]] = {}
    for name in args.systems.split(","):
        sets = [f"data.max_train_pairs_per_domain={args.train_per_domain}", "data.eval_during_training=false",
                *args.overrides]
        if name == "ensemble":
            sets.append(f"options.members={args.members}")
        if name == "dmoerm":
            sets.append(f"options.tasks_file={args.tasks_file}")
        cfg = load_config(configs[name], sets, base=None)
        cfg.data.train = paths
        run = out / name
        if not (run / "train_summary.json").exists():
            train_run(cfg, run, command=command, resume=(run / "config.yaml").exists(), console=console)
        system = load_system(run)
        rep = evaluate_system(system, test)  # routed systems route with their own router
        if name == "dmoerm":
            rep["oracle"] = evaluate_system(system, test, oracle_domains=True)  # the true task handed over
        rep["train_seconds"] = json.loads((run / "train_summary.json").read_text())["train_seconds"]
        rep["params_total"] = system.describe()["total"]["params_total"]
        reports[name] = rep

    # per-task consistency for every system, from its per-pair results grouped by the pair's task
    for rep in reports.values():
        per: dict[str, list[float]] = defaultdict(list)
        for d, v in rep["per_domain"].items():
            per[task_of[d]] += [v["accuracy"]] * v["pairs"]
        rep["per_task_consistency"] = {t: sum(v) / len(v) for t, v in sorted(per.items())}

    lines = [f"command: `{command}`", "",
             f"{len(test)} held-out pairs; training pairs per domain: {args.train_per_domain}", ""]
    tasks = sorted({task_of[d] for d in domains})
    lines += ["| system | " + " | ".join(tasks) + " | overall | macro (domains) | params | train s |",
              "|---|" + "---:|" * (len(tasks) + 4)]
    for name, rep in reports.items():
        cells = [f"{100 * rep['per_task_consistency'][t]:.1f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * rep['accuracy']:.1f} | "
                     f"{100 * rep['macro_accuracy']:.1f} | {rep['params_total'] / 1e6:.1f}M | {rep['train_seconds']:.0f} |")
    lines += ["", "| system | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for name, rep in reports.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * rep['per_domain'][d]['accuracy']:.1f}" for d in domains) + " |")
    if "dmoerm" in reports:
        rep = reports["dmoerm"]
        lines += ["", f"DMoERM task-router accuracy: {100 * rep['task_router_accuracy']:.1f}%; with the true task "
                  f"handed over (oracle routing) DMoERM's overall consistency is {100 * rep['oracle']['accuracy']:.1f}%",
                  "",
                  "| domain | capability | expert accuracy on its own labels | pairs |", "|---|---|---:|---:|"]
        for d, caps in rep["capability_accuracy"].items():
            for c, v in caps.items():
                lines.append(f"| {d} | {c} | {100 * v['accuracy']:.1f} | {v['pairs']} |")
    text = "\n".join(lines)
    console.print(text, highlight=False)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"command": command, "reports": reports}, indent=2))


if __name__ == "__main__":
    main()
