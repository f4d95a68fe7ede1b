"""One reward scale across routes, measured on held-out pairs the calibration never saw.

For a saved routed run (RODOS, ARLISS, DMoERM): per route, the mean and standard deviation of its rewards on both
replies of the held-out pairs of its domains (each pair's domain given, so every text goes to its own route), raw and
calibrated; then the macro accuracy of hard, gated, soft routing and the mixture fallback, raw vs calibrated, on the
same trained routes and the same pairs, with the paired prompt-clustered 95% interval of calibrated minus raw.

    python benchmarks/reward_scale.py runs/demo/rodos --data examples/data [--out scale.json] [--scale-only]

`--scale-only` measures the per-route mean and spread alone (no routing modes): what a slow system's run needs.

The held-out mean and spread are themselves estimates, some from a handful of prompts (newsroom's test texts come
from 4): each route's calibrated mean and std carry a 95% interval from a bootstrap that resamples prompts within
each domain (`eval.intervals.clustered_mean_std_ci`, the accuracy intervals' draws), and each is judged against the
target band (mean within 0.15 of 0, std within 15% of 1): "met" when the interval lies inside the band, "missed"
when it lies outside, else "not resolved". A route is met when both are, missed when either is.

Accuracy only, no timing: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shlex
import sys
from collections import defaultdict
from typing import Any, Sequence

import torch

from moerm.data.grouping import pair_keys
from moerm.data.readers import load_pairs
from moerm.eval.intervals import Interval, clustered_mean_std_ci, paired_clustered_diff_ci
from moerm.systems import load_system
from moerm.systems.calibration import Calibration

MODES = {"hard": {"routing": "hard", "min_confidence": 0.0},
         "gated": {"routing": "gated", "min_confidence": 0.6, "routing_top_k": 2},
         "soft": {"routing": "soft", "routing_top_k": 0},
         "mixture fallback": {"routing": "hard", "min_confidence": 0.6}}


MEAN_BAND = (-0.15, 0.15)  # issue 24's target on the common scale: every route's mean within 0.15 of 0 ...
STD_BAND = (0.85, 1.15)  # ... and every spread within 15% of 1


def route_rewards(system: Any, pairs: Sequence[Any], calibration: Calibration
                  ) -> dict[str, tuple[torch.Tensor, list[Any]]]:
    """Per route (sorted): its (2P,) rewards on both replies of its domains' P pairs, the domain given, and the pairs
    in the same order as the rewards (chosen replies first, then rejected)."""
    system.calibration = calibration
    by: dict[str, list[Any]] = defaultdict(list)
    for p in pairs:
        route = system.route_of(p.domain)
        if route in system.domains:
            by[route].append(p)
    out = {}
    for route, ps in sorted(by.items()):
        prompts = [p.prompt for p in ps] * 2
        replies = [p.chosen for p in ps] + [p.rejected for p in ps]
        r = torch.tensor(system.score(prompts, replies, [ps[0].domain if system.name == "dmoerm" else route]
                                      * len(prompts)).rewards)
        out[route] = (r, list(ps) * 2)
    return out


def summary(rewards: torch.Tensor) -> dict[str, float]:
    """Mean, std and count of one route's (N,) rewards."""
    return {"mean": float(rewards.mean()), "std": float(rewards.std()), "texts": int(rewards.numel())}


def route_stats(system: Any, pairs: Sequence[Any], calibration: Calibration) -> dict[str, dict[str, float]]:
    """Per route: mean and std of its rewards on both replies of its domains' pairs, the domain given."""
    return {route: summary(r) for route, (r, _) in route_rewards(system, pairs, calibration).items()}


def band_verdict(iv: Interval, band: tuple[float, float]) -> str:
    """"met" when the whole interval lies inside the band, "missed" when it lies wholly outside, else "not resolved"."""
    lo, hi = band
    if lo <= iv.low and iv.high <= hi:
        return "met"
    if iv.high < lo or iv.low > hi:
        return "missed"
    return "not resolved"


def scale_intervals(rewards: torch.Tensor, texts: Sequence[Any], *, seed: int = 0) -> dict[str, Any]:
    """One route's mean and std with their prompt-clustered 95% intervals (prompts resampled within each domain),
    each judged against the target band, and the route's verdict. rewards: (N,); texts: the pair of each reward."""
    mean, std = clustered_mean_std_ci(rewards.double().tolist(), pair_keys(texts), [p.domain for p in texts],
                                      seed=seed)
    verdicts = {"mean": band_verdict(mean, MEAN_BAND), "std": band_verdict(std, STD_BAND)}
    route = ("met" if all(v == "met" for v in verdicts.values())
             else "missed" if "missed" in verdicts.values() else "not resolved")
    point = MEAN_BAND[0] <= mean.point <= MEAN_BAND[1] and STD_BAND[0] <= std.point <= STD_BAND[1]
    return {"mean": mean.to_dict(), "std": std.to_dict(), "mean_verdict": verdicts["mean"],
            "std_verdict": verdicts["std"], "verdict": route, "point_in_band": point}


def correct(system: Any, pairs: Sequence[Any]) -> list[bool]:
    prompts = [p.prompt for p in pairs]
    c = system.score(prompts, [p.chosen for p in pairs]).rewards
    r = system.score(prompts, [p.rejected for p in pairs]).rewards
    return [a > b for a, b in zip(c, r)]


def macro(ok: Sequence[bool], pairs: Sequence[Any]) -> float:
    per: dict[str, list[bool]] = defaultdict(list)
    for o, p in zip(ok, pairs):
        per[p.domain].append(o)
    return sum(sum(v) / len(v) for v in per.values()) / len(per)


def measure(system: Any, pairs: Sequence[Any], keys: Sequence[str], calibrated: Calibration,
            scale_only: bool) -> dict[str, Any]:
    """The per-route scale (raw, calibrated, calibrated intervals) and, unless scale_only, each routing mode's macro
    accuracy raw vs calibrated with the paired interval."""
    stats = {"raw": route_stats(system, pairs, Calibration())}
    cal_rewards = route_rewards(system, pairs, calibrated)
    stats["calibrated"] = {route: summary(r) for route, (r, _) in cal_rewards.items()}
    intervals = {route: scale_intervals(r, texts) for route, (r, texts) in cal_rewards.items()}
    accuracy = {}
    base_opts = copy.copy(system.opts)  # the router reads the same options object: set, then restore, in place
    for name, opts in ({} if scale_only else MODES).items():
        for k, v in vars(base_opts).items():
            setattr(system.opts, k, v)
        for k, v in opts.items():
            setattr(system.opts, k, v)
        rows = {}
        for label, cal in (("raw", Calibration()), ("calibrated", calibrated)):
            system.calibration = cal
            rows[label] = correct(system, pairs)
        diff = paired_clustered_diff_ci(rows["calibrated"], rows["raw"], keys, [p.domain for p in pairs], macro=True)
        accuracy[name] = {"raw": macro(rows["raw"], pairs), "calibrated": macro(rows["calibrated"], pairs),
                          "calibrated_minus_raw": diff.to_dict()}
    for k, v in vars(base_opts).items():
        setattr(system.opts, k, v)
    system.calibration = calibrated
    return {"route_scale": stats, "calibrated_intervals": intervals,
            "target": {"mean_band": list(MEAN_BAND), "std_band": list(STD_BAND),
                       "interval": "95%, prompts resampled within each domain, 2000 draws, seed 0"},
            "accuracy": accuracy, "reference": calibrated.reference}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a saved routed run whose routes were calibrated (options.calibration=zscore)")
    ap.add_argument("--data", action="append", required=True, help="held-out pairs (folders: their test* files)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--scale-only", action="store_true", help="only the per-route reward mean and spread, raw and "
                    "calibrated (skip the accuracy of the routing modes)")
    args = ap.parse_args(argv)
    command = "python benchmarks/reward_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    system = load_system(args.run)
    calibrated = system.calibration
    if calibrated.kind == "none":
        raise SystemExit(f"{args.run}: its routes were not calibrated (options.calibration=none)")
    pairs, _ = load_pairs(args.data, split="test")
    known = set(system.domains)
    pairs = [p for p in pairs if system.route_of(p.domain) in known]
    keys = pair_keys(pairs)
    # a route's raw reward for a text does not depend on routing or on the map: where the system can (RODOS), each
    # route scores each text once for the raw and calibrated passes and every routing mode
    reuse = getattr(system, "reusing_route_rewards", None)
    with reuse() if reuse is not None else contextlib.nullcontext():
        result = measure(system, pairs, keys, calibrated, args.scale_only)
    result = {"command": command, "run": args.run, "pairs": len(pairs), "prompts": len(set(keys)), **result}
    stats, intervals, accuracy = result["route_scale"], result["calibrated_intervals"], result["accuracy"]
    print(f"command: {command}\n{len(pairs)} held-out pairs, {len(set(keys))} prompts\n")
    print("| route | raw mean | raw std | calibrated mean | calibrated std | texts |\n|---|---:|---:|---:|---:|---:|")
    for route, raw in stats["raw"].items():
        cal = stats["calibrated"][route]
        print(f"| {route} | {raw['mean']:+.2f} | {raw['std']:.2f} | {cal['mean']:+.2f} | {cal['std']:.2f} | "
              f"{raw['texts']} |")
    print(f"\ncalibrated, with 95% intervals (prompts resampled within each domain); target: mean within "
          f"[{MEAN_BAND[0]:+.2f}, {MEAN_BAND[1]:+.2f}], std within [{STD_BAND[0]:.2f}, {STD_BAND[1]:.2f}]\n")
    print("| route | prompts | calibrated mean [95%] | mean | calibrated std [95%] | std | route |\n"
          "|---|---:|---:|---|---:|---|---|")
    for route, iv in intervals.items():
        m, sd = iv["mean"], iv["std"]
        print(f"| {route} | {m['prompts']} | {m['point']:+.2f} [{m['low']:+.2f}, {m['high']:+.2f}] | "
              f"{iv['mean_verdict']} | {sd['point']:.2f} [{sd['low']:.2f}, {sd['high']:.2f}] | {iv['std_verdict']} | "
              f"{iv['verdict']} |")
    if args.scale_only:
        print("\n(routing modes not measured: --scale-only)")
    else:
        print("\n| routing | macro raw | macro calibrated | calibrated - raw (paired 95%, resampling prompts) |")
        print("|---|---:|---:|---|")
    for name, a in accuracy.items():
        d = a["calibrated_minus_raw"]
        print(f"| {name} | {100 * a['raw']:.1f}% | {100 * a['calibrated']:.1f}% | {100 * d['point']:+.1f} "
              f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
