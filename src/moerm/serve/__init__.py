"""Serving reward systems over HTTP for RLHF loops: FastAPI + uvicorn with dynamic batching.

    moerm serve RUN_DIR --host 127.0.0.1 --port 8000

See docs/SERVING.md for the endpoints, limits, metrics and the OpenRLHF / TRL integrations.
"""

from moerm.serve.app import create_app
from moerm.serve.batcher import DynamicBatcher, QueueFullError
from moerm.serve.config import ServeConfig, ServeConfigError
from moerm.serve.openrlhf import PRESETS, QUERY_FORMATS, ChatFormat, QuerySplitter, SplitError
from moerm.serve.server import BackgroundServer, run_server

__all__ = ["PRESETS", "QUERY_FORMATS", "BackgroundServer", "ChatFormat", "DynamicBatcher", "QuerySplitter", "QueueFullError",
           "ServeConfig", "ServeConfigError", "SplitError", "create_app", "run_server"]
