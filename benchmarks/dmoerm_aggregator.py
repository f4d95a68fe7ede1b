"""DMoERM phase 3 ablation: retrain only the aggregator of a trained DMoERM run, from scratch (the paper) or warm-
started as the mean of the capability experts, and evaluate each on the same held-out pairs.

    .venv/bin/python benchmarks/dmoerm_aggregator.py runs/dmoerm-eval/dmoerm --data ../shared/data \
        --domains summeval,newsroom,topical_chat,d2t_nlg --eval-per-domain 100 --epochs 10,30

The run's phases 1-2 (base RM, experts) are reused as they are; split B is rebuilt from the run's own data and seed,
so every variant trains on exactly the pairs the run's phase 3 used. Also reported: the mean of the experts'
sub-scores with no aggregator training at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from moerm.config import RunConfig, from_dict
from moerm.data.readers import load_pairs
from moerm.eval.metrics import evaluate_system
from moerm.modules.aggregator import CapabilityAggregator
from moerm.runs import cap_per_domain, load_run_data
from moerm.systems import load_system
from moerm.systems.base import FitContext
from moerm.systems.dmoerm import split_ab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--domains", default="summeval,newsroom,topical_chat,d2t_nlg")
    ap.add_argument("--eval-per-domain", type=int, default=100)
    ap.add_argument("--epochs", default="10,30")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    command = "python benchmarks/dmoerm_aggregator.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run = Path(args.run)
    cfg = from_dict(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    train, _, _ = load_run_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_during_training=False)))
    test, _ = load_pairs([str(Path(args.data) / d) for d in args.domains.split(",")], split="test")
    test = cap_per_domain(test, args.eval_per_domain, seed=0)
    system = load_system(run)
    by_task = system._task_pairs(train)
    trained = {t: {k: v.clone() for k, v in m.aggregator.state_dict().items()} for t, m in system.models.items()}
    rows: dict[str, dict] = {"as trained (run's phase 3)": evaluate_system(system, test)}

    def mean_of_experts() -> None:
        for m in system.models.values():
            m.aggregator = CapabilityAggregator(len(m.capabilities), m.aggregator.hidden_size)
            system._start_aggregator_from_experts(m)
            m.aggregator.net[0].weight[1:].zero_()  # exactly the mean: no other hidden unit
            m.aggregator.net[2].weight[0, 1:].zero_()

    with torch.no_grad():
        mean_of_experts()
    rows["mean of expert sub-scores (no phase 3)"] = evaluate_system(system, test)
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in [float(e) for e in args.epochs.split(",")]:
            for init in ("random", "experts"):
                system.opts.aggregator_init, system.opts.aggregator_epochs = init, epochs
                for name, model in system.models.items():
                    torch.manual_seed(cfg.train.seed)
                    model.aggregator = CapabilityAggregator(len(model.capabilities), model.aggregator.hidden_size)
                    _, split_b = split_ab(by_task[name], system.opts.split_a, cfg.train.seed)
                    system._phase3(name, model, split_b, [], Path(tmp) / f"{init}-{epochs}-{name}",
                                   FitContext(Path(tmp), progress=False))
                rows[f"aggregator from {'scratch' if init == 'random' else 'the experts mean'}, {epochs:g} epochs"] = \
                    evaluate_system(system, test)
    for name, m in system.models.items():
        m.aggregator.load_state_dict(trained[name])
    tasks = sorted(next(iter(rows.values()))["per_task"])
    lines = [f"command: `{command}`", "", "| phase 3 | " + " | ".join(tasks) + " | overall |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for label, rep in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * rep['per_task'][t]['accuracy']:.1f}" for t in tasks)
                     + f" | {100 * rep['accuracy']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
