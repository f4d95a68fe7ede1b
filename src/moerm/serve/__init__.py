"""Serving reward systems over HTTP for RLHF loops: FastAPI + uvicorn with dynamic batching.

    moerm serve RUN_DIR --host 127.0.0.1 --port 8000

See docs/SERVING.md for the endpoints, limits, metrics and the OpenRLHF / TRL integrations.
"""

from moerm.serve.app import create_app
from moerm.serve.batcher import DynamicBatcher, QueueFullError
from moerm.serve.config import QUERY_TEMPLATES, ServeConfig, ServeConfigError
from moerm.serve.openrlhf import QuerySplitter, SplitError
from moerm.serve.server import BackgroundServer, run_server

__all__ = ["QUERY_TEMPLATES", "BackgroundServer", "DynamicBatcher", "QuerySplitter", "QueueFullError", "ServeConfig",
           "ServeConfigError", "SplitError", "create_app", "run_server"]
