"""DMoERM task categories: which domains belong to a task and which capability dimensions its experts cover.

Tasks come from config, inline (`options.tasks`) or from a YAML file (`options.tasks_file`), in this shape:

    tasks:
      summarisation:
        domains: [summeval, newsroom]
        capabilities: [coherence, consistency, fluency, relevance, informativeness]

A capability expert trains on every pair of the task that carries labels for it (aspect scores or LLM-judge labels),
so domains of one task may cover different capabilities (summeval has consistency, newsroom informativeness).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from moerm.config import ConfigError

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,59}$")  # safe as a peft adapter, a module key and a folder name


@dataclass(frozen=True)
class TaskSpec:
    name: str
    domains: list[str]
    capabilities: list[str]
    description: str = ""
    capability_descriptions: dict[str, str] = field(default_factory=dict)


def parse_tasks(raw: Any, source: str = "options.tasks") -> list[TaskSpec]:
    """Validate a {task: {domains, capabilities[, description]}} mapping; errors name the task and field."""
    if isinstance(raw, Mapping) and set(raw) == {"tasks"}:
        raw = raw["tasks"]
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source}: expected a mapping of task name -> {{domains, capabilities}}")
    tasks: list[TaskSpec] = []
    owner: dict[str, str] = {}
    for name, spec in raw.items():
        where = f"{source}.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"{where}: task names are letters, digits and _ (starting with a letter)")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'domains' and 'capabilities'")
        unknown = set(spec) - {"domains", "capabilities", "description"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} (domains, capabilities, description)")
        domains = _names(spec.get("domains"), f"{where}.domains", pattern=None)
        caps_raw = spec.get("capabilities")
        descriptions: dict[str, str] = {}
        if isinstance(caps_raw, Mapping):  # capability: description (used by the LLM judge prompt)
            descriptions = {str(k): str(v) for k, v in caps_raw.items()}
            caps_raw = list(caps_raw)
        caps = _names(caps_raw, f"{where}.capabilities", pattern=NAME)
        for d in domains:
            if d in owner:
                raise ConfigError(f"{where}.domains: domain {d!r} is already in task {owner[d]!r}")
            owner[d] = name
        tasks.append(TaskSpec(name, domains, caps, str(spec.get("description", "")), descriptions))
    return tasks


def _names(value: Any, where: str, pattern: re.Pattern[str] | None) -> list[str]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of names")
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{where}: {v!r} is not a name")
        if pattern is not None and not pattern.match(v):
            raise ConfigError(f"{where}: {v!r}: use letters, digits and _ (starting with a letter)")
        out.append(v)
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: duplicate names in {out}")
    return out


def load_tasks_file(path: str | Path) -> list[TaskSpec]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tasks file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from None
    return parse_tasks(raw, str(p))


def tasks_to_dict(tasks: Sequence[TaskSpec]) -> dict[str, dict[str, Any]]:
    """The inline form, written into the saved config so a run never depends on the tasks file again."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        caps: Any = {c: t.capability_descriptions.get(c, "") for c in t.capabilities} if t.capability_descriptions else list(t.capabilities)
        out[t.name] = {"domains": list(t.domains), "capabilities": caps,
                       **({"description": t.description} if t.description else {})}
    return out


def task_of_domain(tasks: Sequence[TaskSpec]) -> dict[str, str]:
    return {d: t.name for t in tasks for d in t.domains}
