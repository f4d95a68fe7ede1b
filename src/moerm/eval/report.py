"""Markdown tables for evaluation reports and system descriptions."""

from __future__ import annotations

from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def accuracy_table(report: dict[str, Any], title: str = "") -> str:
    """One run: accuracy per domain, then the pair-weighted and macro averages."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| domain | pairs | accuracy (%) |", "|---|---:|---:|"]
    for d, v in report["per_domain"].items():
        lines.append(f"| {d} | {v['pairs']} | {_pct(v['accuracy'])} |")
    lines.append(f"| **all (pair-weighted)** | {report['pairs']} | **{_pct(report['accuracy'])}** |")
    lines.append(f"| **macro average** | | **{_pct(report['macro_accuracy'])}** |")
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
    """Several seeds: mean +- std per domain."""
    def ms(v: dict[str, float]) -> str:
        return f"{_pct(v['mean'])} ± {_pct(v['std'])}"

    lines = [f"### {title}", ""] if title else []
    lines += [f"| domain | accuracy (%), mean ± std over {agg['runs']} runs |", "|---|---:|"]
    for d, v in agg["per_domain"].items():
        lines.append(f"| {d} | {ms(v)} |")
    lines.append(f"| **all (pair-weighted)** | **{ms(agg['accuracy'])}** |")
    lines.append(f"| **macro average** | **{ms(agg['macro_accuracy'])}** |")
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
