"""Serving reward systems over HTTP for RLHF loops: FastAPI + uvicorn with dynamic batching.

    moerm serve RUN_DIR --host 127.0.0.1 --port 8000

See docs/SERVING.md for the endpoints, limits, metrics and the OpenRLHF / TRL integrations. The names below load on
first use, so `moerm.serve.config` (the CLI's defaults) comes without the app, torch and uvicorn.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"create_app": "app", "DynamicBatcher": "batcher", "QueueFullError": "batcher", "ServeConfig": "config",
          "ServeConfigError": "config", "PRESETS": "openrlhf", "QUERY_FORMATS": "openrlhf", "ChatFormat": "openrlhf",
          "QuerySplitter": "openrlhf", "SplitError": "openrlhf", "BackgroundServer": "server", "run_server": "server"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'moerm.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moerm.serve.{_WHERE[name]}"), name)
