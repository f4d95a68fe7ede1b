"""The benchmark's configuration: a typed `BenchConfig`, loadable from YAML presets and `--set key=value` overrides.

A bench trains every system in `systems` once per seed in `seeds` on the same data, backbone and budget. Each
system's run config is built as: RunConfig defaults <- `model`/`train` (shared by all systems) <- `per_system[name]`
(its own model/train/options), plus `backbone`, `max_length`, the seed, the bench's prepared data and the options of
the system's bench plan (`RewardSystem.bench_plan`: e.g. DMoERM's tasks restricted to the data's labelled domains).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moerm.config import (
    REPO_ROOT, ConfigError, ModelConfig, RunConfig, TrainConfig, _deep_update, _set_dotted, from_dict, parse_override,
    resolve_path,
)

PRESETS = ("smoke", "cpu-small", "cpu-medium", "paper")
TINY_BACKBONE = "tiny-random-bert"  # built by the bench into OUT/backbone (a 2-layer, 32-wide random BERT)
PER_SYSTEM_SECTIONS = ("model", "train", "options", "components", "domains")
RUN_SECTIONS = ("model", "train", "options", "components")  # the per_system sections that go into a run config
# Settings that may change between runs into the same output folder (they do not change what a cell trains).
REUSABLE_KEYS = ("name", "systems", "seeds", "inference", "eval_batch_size", "oracle_routing", "device", "threads",
                 "prune_checkpoints", "targets", "reference")
ALL_SYSTEMS = "all"  # Target.systems: every system with results
BEST_ROUTED = "best_routed"  # Target.systems: the routed system with the largest margin over `vs` (or value)
_MISSING = object()
# Keys of older bench configs, and where their settings live now.
MOVED_KEYS = {
    "dmoerm_tasks_file": "per_system.dmoerm.options.tasks_file (DMoERM's own option)",
    "dmoerm_tasks": "per_system.dmoerm.options.tasks (DMoERM's own option)",
    "inference.arliss_switch": "inference.all_modes (a row per extra inference mode of every system, "
                               "e.g. 'arliss (switch)')",
}


def all_systems() -> list[str]:
    """Every registered system, in registration order (a system registered later joins the default grid)."""
    import moerm.systems  # noqa: F401 - importing the package registers the built-in systems
    from moerm.systems.base import REGISTRY

    return list(REGISTRY)


def check_moved_keys(data: dict[str, Any], where: str = "") -> None:
    """An old key is an error that says where its setting moved."""
    for key, now in MOVED_KEYS.items():
        section: Any = data
        for part in key.split("."):
            section = section.get(part, _MISSING) if isinstance(section, dict) else _MISSING
        if section is not _MISSING:
            raise ConfigError(f"{where}{key} has moved: set {now}")


@dataclass
class InferenceConfig:
    """The side-by-side throughput measurement (one batch, every system, repeats interleaved)."""

    pairs: int = 64  # held-out pairs in the shared batch (chosen + rejected: twice as many sequences)
    batch_size: int = 32  # forward batch size inside `score`
    repeats: int = 3  # timed repeats per system (median reported), after one warm-up
    # also time every other inference mode of each system (its `inference_modes`), a row each: "arliss (switch)"
    all_modes: bool = False
    interleave: bool = True  # all systems loaded at once, repeats interleaved; false: one system at a time
    seed: int = 0  # which pairs, in which order

    def __post_init__(self) -> None:
        if self.pairs < 1 or self.batch_size < 1 or self.repeats < 1:
            raise ConfigError("inference.pairs, inference.batch_size and inference.repeats must be >= 1")


@dataclass
class DomainGroup:
    """Domains the report shows in a table of their own (e.g. the router paper's, the aspect-labelled ones).

    `domain_given`: the group's held-out pairs are scored with each pair's domain passed to `score` (as an RLHF
    trainer that knows each prompt's source would pass it), for every system; systems that do not route ignore it.
    The other groups are scored as deployed: routed systems route with their own router.
    """

    name: str
    title: str = ""  # the table's heading (default: the name)
    domains: list[str] = field(default_factory=list)
    domain_given: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name in (ALL_SYSTEMS, BEST_ROUTED):
            raise ConfigError(f"groups: a group needs a name (not {ALL_SYSTEMS!r} or {BEST_ROUTED!r})")
        if not self.domains:
            raise ConfigError(f"groups.{self.name}.domains: give at least one domain")
        self.title = self.title or self.name


@dataclass
class Target:
    """A target the report checks against the results (met / missed / not resolved, with the figures that decide it).

    The value is a system's macro accuracy (mean over seeds of the per-seed mean over domains) on the domains of
    `groups` that it covers, scored the way those groups are scored (own router, or domain given). It must reach
    `min`, and/or `vs`'s macro on exactly the same domains plus `margin`; `max_params_vs` also bounds its parameters
    to that share of `vs`'s. `systems`: names, "all" (every system with results; each must meet it) or
    "best_routed" (the routed system with the largest margin over `vs`, else the highest value).
    It is met only when the 95% interval clears the line: the lower end of the value's clustered interval reaches
    `min`, and that of the paired difference from `vs` reaches `margin`; missed when the interval lies below the
    line; else "not resolved" (the held-out prompts cannot tell).
    """

    name: str
    systems: list[str] = field(default_factory=lambda: [ALL_SYSTEMS])
    groups: list[str] = field(default_factory=list)  # default: every group scored routed (not domain_given)
    min: float | None = None  # a floor on the macro accuracy (0.55 = 55%)
    vs: str | None = None  # the reference system, on the same domains
    margin: float = 0.0  # value >= vs + margin (0.03 = 3 points; negative: within)
    max_params_vs: float | None = None  # parameters < this share of vs's (0.15 = under 15%)

    def __post_init__(self) -> None:
        if self.min is None and self.vs is None:
            raise ConfigError(f"targets: {self.name!r} needs min or vs")
        if self.max_params_vs is not None and self.vs is None:
            raise ConfigError(f"targets: {self.name!r}: max_params_vs needs vs")
        if not self.systems:
            raise ConfigError(f"targets: {self.name!r}: systems is empty")


@dataclass
class BenchConfig:
    """One benchmark grid: systems x seeds on the same data, backbone and training budget."""

    name: str = "custom"
    systems: list[str] = field(default_factory=all_systems)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # data: files or folders (train* / test* files in folders); a folder of domain folders is read per domain
    data: list[str] = field(default_factory=list)
    data_fallback: list[str] = field(default_factory=list)  # used when no `data` path exists
    eval_data: list[str] = field(default_factory=list)  # default: the test* files of the `data` folders
    domains: list[str] | None = None  # keep only these domains (None: every domain in the data, or the groups')
    # domain groups: a table each in the report; a domain_given group is scored with each pair's domain given
    groups: list[DomainGroup] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)  # checked in the report's Targets table
    synthetic_data: bool = False  # generate a tiny toy dataset with aspect scores (the smoke preset)
    max_train_pairs_per_domain: int | None = None
    max_eval_pairs_per_domain: int | None = None
    data_seed: int = 0  # the per-domain samples; the same for every system and seed
    on_invalid: str = "skip"
    # model and training, shared by every system
    backbone: str = "minilm"  # HF name/path, 'minilm' (embedded) or 'tiny-random-bert' (built into OUT)
    max_length: int = 128
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (not backbone/max_length)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (not seed)
    per_system: dict[str, Any] = field(default_factory=dict)  # system -> {model: {...}, train: {...}, options: {...}}
    eval_batch_size: int = 32
    oracle_routing: bool = False  # also evaluate routed systems with each pair's true domain given (upper bound)
    # the system every other one is compared with in each group's table (paired differences with intervals)
    reference: str | None = "baseline"
    # top tuning: score the held-out pairs from the bench's trunk cache (its lower blocks once for every system and
    # seed; rewards within fp16 rounding of uncached scoring); the inference table always runs whole models
    eval_trunk_cache: bool = True
    # an ensemble cell combines already trained cells of this system (e.g. baseline) instead of training members:
    # seed s takes the cells of `members` consecutive seeds from s on (cyclic), so the grid trains them once
    ensemble_members_from: str | None = None
    device: str = "auto"  # where saved systems are evaluated and timed: auto (cuda when available) | cpu | cuda:N
    threads: int | None = None  # torch CPU threads during the bench (None: torch's default)
    prune_checkpoints: bool = True  # delete a finished cell's training checkpoints (its saved model stays)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        if not self.systems:
            raise ConfigError("systems: give at least one system")
        if len(set(self.systems)) != len(self.systems):
            raise ConfigError(f"systems: duplicate names in {self.systems}")
        if not self.seeds:
            raise ConfigError("seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: duplicate seeds in {self.seeds}")
        if self.on_invalid not in ("error", "skip"):
            raise ConfigError(f"on_invalid must be error or skip; got {self.on_invalid!r}")
        for key in ("max_train_pairs_per_domain", "max_eval_pairs_per_domain"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be >= 1 (or null for no cap); got {v}")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8; got {self.max_length}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or null for torch's default); got {self.threads}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
        for key in ("backbone", "max_length"):
            if key in self.model:
                raise ConfigError(f"model.{key}: set the top-level '{key}' instead")
        if "seed" in self.train:
            raise ConfigError("train.seed: the bench sets each run's seed from 'seeds'")
        self._check_groups()
        src = self.ensemble_members_from
        if src is not None and "ensemble" in self.systems:
            if src not in self.systems or self.systems.index(src) > self.systems.index("ensemble"):
                raise ConfigError(f"ensemble_members_from: {src!r} must be one of the systems, listed before ensemble")
            members = self.ensemble_members()
            if members > len(self.seeds):
                raise ConfigError(f"ensemble_members_from: the ensemble has {members} members but the bench has "
                                  f"{len(self.seeds)} seeds of {src}; give more seeds or fewer members")

    def ensemble_members(self) -> int:
        return ensemble_members(self.per_system)

    def ensemble_member_seeds(self, seed: int) -> list[int]:
        """With ensemble_members_from: the seeds of the cells that the ensemble cell of `seed` combines."""
        i = self.seeds.index(seed)
        return [self.seeds[(i + k) % len(self.seeds)] for k in range(self.ensemble_members())]

    def _check_groups(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ConfigError(f"groups: duplicate names in {names}")
        seen: dict[str, str] = {}
        for g in self.groups:
            for d in g.domains:
                if d in seen:
                    raise ConfigError(f"groups.{g.name}: domain {d!r} is already in group {seen[d]!r}")
                seen[d] = g.name
        if self.groups and self.domains is None:
            self.domains = list(seen)  # the groups' domains, in their order
        elif self.domains is not None:
            extra = [d for d in seen if d not in self.domains]
            if extra:
                raise ConfigError(f"groups: domain {extra[0]!r} is not in domains")
        for t in self.targets:
            for g in t.groups:
                if g not in names:
                    raise ConfigError(f"targets: {t.name!r}: unknown group {g!r} (groups: {', '.join(names) or 'none'})")
            given = {self.group(g).domain_given for g in t.groups}
            if len(given) > 1:
                raise ConfigError(f"targets: {t.name!r}: its groups mix domain_given and routed scoring")

    def group(self, name: str) -> DomainGroup:
        return next(g for g in self.groups if g.name == name)

    def given_domains(self) -> list[str]:
        """Domains whose held-out pairs are scored with the pair's domain given (the domain_given groups')."""
        return [d for g in self.groups if g.domain_given for d in g.domains]

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> dict[str, Any]:
        """What decides a cell's training: everything but the grid's extent and the inference settings."""
        return {k: v for k, v in self.to_dict().items() if k not in REUSABLE_KEYS}


def preset_path(name: str) -> Path:
    for cand in (Path.cwd() / "configs" / "bench" / f"{name}.yaml", REPO_ROOT / "configs" / "bench" / f"{name}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (configs/bench/<name>.yaml)")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_bench_config(preset: str | None = None, path: str | Path | None = None,
                      overrides: list[str] | None = None) -> BenchConfig:
    """Defaults <- preset YAML <- `path` YAML <- `--set key=value` overrides; then every system's config is checked."""
    if preset is None and path is None:
        raise ConfigError(f"give a preset ({', '.join(PRESETS)}) or a bench config file")
    data: dict[str, Any] = {}
    if preset is not None:
        _deep_update(data, _read_yaml(preset_path(preset)))
    if path is not None:
        _deep_update(data, _read_yaml(Path(path)))
    for ov in overrides or []:
        k, v = parse_override(ov)
        if k in ("systems", "seeds") and isinstance(v, (int, str)):
            v = [s for s in str(v).split(",") if s]  # --set seeds=0,1,2
            v = [int(s) if k == "seeds" and s.strip().lstrip("-").isdigit() else s for s in v]
        _set_dotted(data, k, v)
    check_moved_keys(data)
    cfg = from_dict(BenchConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: BenchConfig) -> None:
    """Every error names its key: unknown systems, and each section a system's run config is built from."""
    from moerm.systems.base import get_system_class

    for i, name in enumerate(cfg.systems):
        try:
            get_system_class(name)
        except ValueError as e:
            raise ConfigError(f"systems[{i}]: {e}") from None
    from_dict(ModelConfig, dict(cfg.model), "model")
    from_dict(TrainConfig, dict(cfg.train), "train")
    for name, section in cfg.per_system.items():
        where = f"per_system.{name}"
        try:
            get_system_class(name)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: expected a mapping with {', '.join(PER_SYSTEM_SECTIONS)}")
        unknown = set(section) - set(PER_SYSTEM_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config key '{where}.{sorted(unknown)[0]}' (known: {', '.join(PER_SYSTEM_SECTIONS)})")
        if section.get("domains") is not None:
            system_domains(cfg, name)  # every entry names a group or a domain
        for key, cls in (("model", ModelConfig), ("train", TrainConfig)):
            sub = section.get(key) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping")
            if key == "model" and {"backbone", "max_length"} & set(sub):
                raise ConfigError(f"{where}.model: backbone and max_length are shared; set them at the top level")
            if key == "train" and "seed" in sub:
                raise ConfigError(f"{where}.train.seed: the bench sets each run's seed from 'seeds'")
            from_dict(cls, dict(sub), f"{where}.{key}")
    for t in cfg.targets:  # a known system this grid does not run reads n/a in the report; a typo is an error
        for s in [*t.systems, *([t.vs] if t.vs else [])]:
            if s not in (ALL_SYSTEMS, BEST_ROUTED):
                try:
                    get_system_class(s)
                except ValueError as e:
                    raise ConfigError(f"targets: {t.name!r}: {e}") from None
    for name in cfg.systems:
        options = system_options(cfg, name)
        cls = get_system_class(name)
        if cls.options_class is not None:
            try:
                from_dict(cls.options_class, options, f"per_system.{name}.options")
            except ConfigError:
                raise
            except ValueError as e:  # an options class's own check (e.g. options.inference must be ...)
                raise ConfigError(f"per_system.{name}.options: {e}") from None
        elif options:
            raise ConfigError(f"per_system.{name}.options: system {name!r} takes no options")


def system_options(cfg: BenchConfig, system: str) -> dict[str, Any]:
    return dict((cfg.per_system.get(system) or {}).get("options") or {})


def system_domains(cfg: BenchConfig, system: str) -> list[str] | None:
    """`per_system.<system>.domains` (domain or group names) as domains; None: every domain of the bench."""
    given = (cfg.per_system.get(system) or {}).get("domains")
    if given is None:
        return None
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not given:
        raise ConfigError(f"per_system.{system}.domains: expected a list of domain or group names")
    groups = {g.name: g for g in cfg.groups}
    out: list[str] = []
    for i, entry in enumerate(given):
        if entry in groups:
            out += [d for d in groups[entry].domains if d not in out]
        elif cfg.domains is None or entry in cfg.domains:
            out += [entry] if entry not in out else []
        else:
            raise ConfigError(f"per_system.{system}.domains[{i}]: {entry!r} is neither a group "
                              f"({', '.join(groups) or 'none'}) nor one of the bench's domains")
    return out


def ensemble_members(per_system: dict[str, Any]) -> int:
    """How many members the bench's ensemble has: per_system.ensemble.options.members, else the system's default."""
    from moerm.systems.ensemble import EnsembleOptions

    options = (per_system.get("ensemble") or {}).get("options") or {}
    return int(options.get("members", EnsembleOptions.members))


def run_config(cfg: BenchConfig, system: str, seed: int, backbone: str, train: list[str],
               feature_cache: str | None = None, extra_options: dict[str, Any] | None = None,
               trunk_cache: str | None = None) -> RunConfig:
    """The RunConfig of one cell: shared settings, then the system's own, then seed and data."""
    data: dict[str, Any] = {
        "system": system,
        "model": {**copy.deepcopy(cfg.model), "backbone": backbone, "max_length": cfg.max_length},
        "train": copy.deepcopy(cfg.train),
        "options": {},
    }
    if feature_cache is not None and "feature_cache" not in data["model"]:
        data["model"]["feature_cache"] = feature_cache
    if trunk_cache is not None and "trunk_cache" not in data["model"]:
        data["model"]["trunk_cache"] = trunk_cache
    own = copy.deepcopy(cfg.per_system.get(system) or {})
    _deep_update(data, {k: v for k, v in own.items() if v is not None and k in RUN_SECTIONS})
    data["options"].update(extra_options or {})
    data["train"]["seed"] = seed
    data["data"] = {"train": list(train), "eval": [], "eval_during_training": False, "on_invalid": "error"}
    try:
        return from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"system {system}: {e}") from None
