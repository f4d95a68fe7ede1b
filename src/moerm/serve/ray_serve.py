"""The reward server as a Ray Serve deployment: N replicas behind Ray Serve's proxy and router.

    pip install 'moerm[ray]'
    moerm serve RUN --ray --replicas 2 --port 8000            # a local Ray instance, or the cluster of $RAY_ADDRESS
    serve run moerm.serve.ray_serve:app_builder run=RUN replicas=2     # Ray's own CLI (same settings as key=value)

Each replica is the same FastAPI app as `moerm serve` (`create_app`): the same endpoints, dynamic batching, request
limits, auth and live reload, over a system it loads in its constructor (so Ray routes nothing to it before it can
score). Ray Serve's proxy takes the HTTP connections (the connection-level guards of `moerm serve`'s own uvicorn,
header deadline and connection cap, are Ray's proxy's concern there) and spreads requests over the replicas; a
replica that dies is replaced by Ray Serve, and a request that was on it fails with a 5xx from the proxy (never a
reward). Each replica polls the run folder, so `moerm add-domain` on a shared run folder reaches every replica.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from moerm.serve.app import create_app
from moerm.serve.config import ServeConfig, ServeConfigError

DEPLOYMENT = "moerm"


@dataclass(frozen=True)
class ReplicaSpec:
    """How many replicas and what each reserves from Ray (CPUs, a GPU or a fraction of one)."""

    replicas: int = 1
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ServeConfigError(f"replicas must be >= 1; got {self.replicas}")
        if self.cpus <= 0 or self.gpus < 0:
            raise ServeConfigError(f"replica CPUs must be > 0 and GPUs >= 0; got {self.cpus}, {self.gpus}")


class RewardReplica:
    """One replica: loads the run's system, then serves `create_app` over it."""

    def __init__(self, run: str, cfg: ServeConfig):
        from moerm.serve.app import _loader

        system = _loader(run, cfg)()  # torch threads set, the run loaded: Ray marks the replica ready after this
        self.moerm_app = create_app(run, cfg, preloaded=system)  # not `app`: Ray's ingress wrapper owns that name

    def __serve_build_asgi_app__(self) -> Any:
        return self.moerm_app

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose system failed is restarted."""
        state = self.moerm_app.state.moerm
        if state.status == "error":
            raise RuntimeError(state.error)


def _require_ray() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise ServeConfigError("--ray needs Ray Serve: pip install 'moerm[ray]'") from None
    return serve


def deployment(run: str, cfg: ServeConfig, spec: ReplicaSpec) -> Any:
    """The Ray Serve application: `spec.replicas` RewardReplicas of `run`."""
    serve = _require_ray()
    cls = serve.deployment(
        serve.ingress()(RewardReplica), name=DEPLOYMENT, num_replicas=spec.replicas,
        ray_actor_options={"num_cpus": spec.cpus, "num_gpus": spec.gpus},
        # Ray's default (5) would cap what one replica can batch; its own queue bound (503 past it) is the limit.
        max_ongoing_requests=cfg.max_queue, health_check_period_s=2.0, health_check_timeout_s=30.0)
    return cls.bind(run, cfg)


def start(run: str, cfg: ServeConfig, spec: ReplicaSpec, blocking: bool = False) -> Any:
    """Start Ray (the cluster of $RAY_ADDRESS, else a local instance), Ray Serve's proxy on cfg.host:cfg.port, and
    the deployment; returns once every replica is up (or, `blocking`, serves until Ctrl-C)."""
    import ray

    serve = _require_ray()
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(deployment(run, cfg, spec), name=DEPLOYMENT, route_prefix="/", blocking=blocking)


def run_ray(run: str, cfg: ServeConfig, spec: ReplicaSpec) -> None:
    """`moerm serve --ray`: serve until Ctrl-C, then take the deployment down."""
    serve = _require_ray()
    try:
        start(run, cfg, spec, blocking=True)
    finally:
        serve.shutdown()


_INT = {f.name for f in dataclasses.fields(ServeConfig) if f.type in ("int", "int | None")}
_FLOAT = {f.name for f in dataclasses.fields(ServeConfig) if f.type in ("float", "float | None")}


def app_builder(args: dict[str, str]) -> Any:
    """`serve run moerm.serve.ray_serve:app_builder run=RUN [replicas=N] [cpus=C] [gpus=G] [SETTING=VALUE ...]`,
    SETTING any ServeConfig field (max_batch=64, max_batch_tokens=8192, query_template=auto, ...)."""
    args = dict(args)
    if "run" not in args:
        raise ServeConfigError("serve run moerm.serve.ray_serve:app_builder needs run=RUN_FOLDER")
    run = args.pop("run")
    spec = ReplicaSpec(int(args.pop("replicas", 1)), float(args.pop("cpus", 1.0)), float(args.pop("gpus", 0.0)))
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key not in fields:
            raise ServeConfigError(f"{key}={value}: not a server setting (one of {', '.join(sorted(fields))})")
        if key in _INT:
            kwargs[key] = int(value)
        elif key in _FLOAT:
            kwargs[key] = float(value)
        elif key in ("batching", "freeze_gc"):
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[key] = value
    return deployment(run, ServeConfig(**kwargs), spec)
