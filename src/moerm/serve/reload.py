"""Which version of a served run is on disk, so the server can swap to a new one without a restart.

`moerm add-domain RUN ...` writes the new domain's files and a new router version, then the routed system's index,
and last the run's `model/system.json` (its save marker: "written last, it marks a complete save"), atomically
(a new file renamed over the old one). The server's version marker is therefore that file's identity:
(inode, size, modification time in ns) of `model/system.json`, one `stat` call. When it changes, the run is loaded
again with `load_system(run)`; the router version the loaded system answers with is its `router_version`
attribute (RODOS and ARLISS keep it; None for systems without a router), reported by /v1/info and in the
`X-Moerm-Router-Version` header of every scoring answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moerm.systems.base import SYSTEM_FILE, find_model_dir

Marker = tuple[int, int, int]


def marker_path(run: str | os.PathLike[str]) -> Path:
    """The file whose identity marks a complete save of `run`: its model folder's system.json."""
    return find_model_dir(run) / SYSTEM_FILE


def read_marker(path: Path) -> Marker | None:
    """(inode, size, mtime_ns) of the save marker; None while it is missing (a save in progress)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def router_version(system: Any) -> int | None:
    """The router version a loaded system scores with (None: no router)."""
    v = getattr(system, "router_version", None)
    return int(v) if isinstance(v, int) else None
