"""Markdown tables for evaluation reports and system descriptions."""

from __future__ import annotations

from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def ci_text(ci: dict[str, Any] | None) -> str:
    """"[58.1, 64.4]": a 95% interval in percent; "–" where there is none."""
    return "–" if not ci else f"[{_pct(ci['low'])}, {_pct(ci['high'])}]"


def diff_text(d: dict[str, Any] | None) -> str:
    """"+2.2 [-1.4, +6.0]": a paired difference in points with its interval."""
    if not d:
        return "–"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


INTERVAL_NOTE = ("95% intervals from a bootstrap that resamples prompts (all pairs of a drawn prompt together), within "
                 "each domain; the macro average's too.")


def _prompts(v: dict[str, Any]) -> str:
    return str(v["prompts"]) if "prompts" in v else "–"


def accuracy_table(report: dict[str, Any], title: str = "") -> str:
    """One run: accuracy per domain with its prompts and 95% interval, then the pair-weighted and macro averages."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| domain | pairs | prompts | accuracy (%) | 95% interval |", "|---|---:|---:|---:|---:|"]
    for d, v in report["per_domain"].items():
        lines.append(f"| {d} | {v['pairs']} | {_prompts(v)} | {_pct(v['accuracy'])} | {ci_text(v.get('ci'))} |")
    lines.append(f"| **all (pair-weighted)** | {report['pairs']} | {_prompts(report)} | **{_pct(report['accuracy'])}** | "
                 f"{ci_text(report.get('accuracy_ci'))} |")
    lines.append(f"| **macro average** | | | **{_pct(report['macro_accuracy'])}** | "
                 f"{ci_text(report.get('macro_accuracy_ci'))} |")
    if "accuracy_ci" in report:
        lines += ["", INTERVAL_NOTE]
    if report.get("per_subset"):
        lines += ["", subset_table(report["per_subset"], report.get("per_subset_group"))]
    lines += ["", f"reward mean {report['reward_mean']:.3f}, std {report['reward_std']:.3f}; "
              f"latency {report['latency_ms_per_pair']:.1f} ms per pair ({report['pairs_per_second']:.1f} pairs/s)"]
    if "router_confusion" in report:
        lines += ["", f"router accuracy {_pct(report['router_accuracy'])}%, fallback rate "
                  f"{_pct(report['fallback_rate'])}%", "", matrix_table(report["router_confusion"], "true \\ routed")]
    if "expert_utilisation" in report:
        lines += ["", "expert utilisation (share of the domain's inputs whose top-k includes the expert):", "",
                  matrix_table(report["expert_utilisation"], "domain \\ expert", percent=True)]
    if "per_task" in report:
        lines += ["", "| task | pairs | consistency (%) |", "|---|---:|---:|"]
        lines += [f"| {t} | {v['pairs']} | {_pct(v['accuracy'])} |" for t, v in report["per_task"].items()]
        lines += ["", f"task router accuracy {_pct(report['task_router_accuracy'])}%, fallback rate "
                  f"{_pct(report['fallback_rate'])}%", "",
                  matrix_table(report["task_router_confusion"], "true task \\ routed")]
    if report.get("capability_accuracy"):
        lines += ["", "capability experts, accuracy (%) on their own aspect labels (held-out pairs, ties dropped):", "",
                  matrix_table({d: {c: v["accuracy"] for c, v in row.items()}
                                for d, row in report["capability_accuracy"].items()}, "domain \\ capability",
                               percent=True)]
    return "\n".join(lines)


def _acc_cell(v: dict[str, Any]) -> str:
    """One run's accuracy, or mean ± std over runs."""
    return _pct(v["accuracy"]) if "accuracy" in v else f"{_pct(v['mean'])} ± {_pct(v['std'])}"


def subset_table(per_subset: dict[str, dict[str, Any]], groups: dict[str, dict[str, Any]] | None = None) -> str:
    """Accuracy per subset within each domain (one run, or mean ± std over runs), then each domain's roll-up groups
    (`*/style0`: one RM-Bench style over its sources; `LLMBar/*`: a prefix), as RewardBench reports subsets."""
    lines = ["accuracy per subset (the data's `subset`; groups roll up `/`-separated names):", "",
             "| domain | subset | pairs | accuracy (%) |", "|---|---|---:|---:|"]
    for d, row in per_subset.items():
        lines += [f"| {d} | {s} | {v['pairs']} | {_acc_cell(v)} |" for s, v in row.items()]
        for g, v in ((groups or {}).get(d) or {}).items():
            lines.append(f"| {d} | _{g}_ ({v['subsets']} subsets) | {v['pairs']} | {_acc_cell(v)} |")
    return "\n".join(lines)


def matrix_table(rows: dict[str, dict[str, float]], corner: str, percent: bool = False) -> str:
    """A row-keyed matrix (confusion counts, expert shares) as Markdown."""
    cols = sorted({c for row in rows.values() for c in row})
    lines = [f"| {corner} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in rows.items():
        cells = [(_pct(row[c]) if percent else f"{row[c]:g}") if c in row else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate_table(agg: dict[str, Any], title: str = "") -> str:
    """Several seeds: per domain the mean ± std over seeds (the seed spread) and the 95% interval of that mean over
    the prompts (the sampling spread)."""
    def ms(v: dict[str, float]) -> str:
        return f"{_pct(v['mean'])} ± {_pct(v['std'])}"

    lines = [f"### {title}", ""] if title else []
    lines += [f"| domain | pairs | prompts | accuracy (%), mean ± std over {agg['runs']} runs | 95% interval |",
              "|---|---:|---:|---:|---:|"]
    for d, v in agg["per_domain"].items():
        lines.append(f"| {d} | {v.get('pairs', '–')} | {_prompts(v)} | {ms(v)} | {ci_text(v.get('ci'))} |")
    lines.append(f"| **all (pair-weighted)** | {agg.get('pairs', '–')} | {_prompts(agg)} | **{ms(agg['accuracy'])}** | "
                 f"{ci_text(agg.get('accuracy_ci'))} |")
    lines.append(f"| **macro average** | | | **{ms(agg['macro_accuracy'])}** | {ci_text(agg.get('macro_accuracy_ci'))} |")
    if "accuracy_ci" in agg:
        lines += ["", "± is the spread over training seeds; the interval, the spread over held-out prompts of the "
                  "mean over seeds: " + INTERVAL_NOTE]
    if agg.get("per_subset"):
        lines += ["", subset_table(agg["per_subset"], agg.get("per_subset_group"))]
    return "\n".join(lines)


def info_table(info: dict[str, Any]) -> str:
    """Parameters and bytes on disk per component."""
    lines = ["| component | parameters | trainable | bytes on disk |", "|---|---:|---:|---:|"]
    rows = list(info["components"].items()) + [("**total**", info["total"])]
    for name, c in rows:
        size = c.get("bytes_on_disk")
        lines.append(f"| {name} | {c['params_total']:,} | {c['params_trainable']:,} | "
                     f"{'' if size is None else f'{size:,}'} |")
    return "\n".join(lines)


def calibration_table(info: dict[str, Any]) -> str | None:
    """Each route's map onto the common reward scale (`moerm info`), None when the system keeps raw rewards."""
    cal = info.get("calibration") or {}
    if cal.get("kind", "none") == "none":
        return None
    lines = [f"calibration {cal['kind']}: reward = (raw - mean) / std per route; fitted on {cal.get('reference', '')}",
             "", "| route | mean | std | reference texts |", "|---|---:|---:|---:|"]
    for route, m in cal.get("routes", {}).items():
        lines.append(f"| {route} | {m['mean']:+.4f} | {m['std']:.4f} | {m['texts']} |")
    return "\n".join(lines)


def comparison_table(rows: dict[str, dict[str, Any]], reference: str) -> str:
    """Each evaluated run (or seed group) minus `reference` on the same pairs: macro and pair-weighted differences
    in points with the paired clustered bootstrap's 95% interval, and the domains whose interval excludes 0."""
    lines = [f"### Differences from {reference} (same pairs)", "",
             "| run | pairs | prompts | macro (points) | pair-weighted (points) | domains whose interval excludes 0 |",
             "|---|---:|---:|---:|---:|---|"]
    for name, c in rows.items():
        sure = [f"{d} {100 * v['diff']:+.1f}" for d, v in c["per_domain"].items() if v["excludes_zero"]]
        lines.append(f"| {name} | {c['pairs']} | {c['prompts']} | {diff_text(c['macro'])} | {diff_text(c['overall'])} | "
                     f"{', '.join(sure) or 'none'} |")
    return "\n".join(lines + ["", "Paired bootstrap: both sides resampled with the same prompts, within each domain; "
                               "a difference is resolved only where its interval excludes 0."])
