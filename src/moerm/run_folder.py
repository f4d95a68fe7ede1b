"""Guarding a run folder: what may be trained into it, and one process at a time.

`inspect_run_folder` says whether a folder is absent, empty, a moerm run (it has `config.yaml`) or something else
(the user's own files: refused, whatever they are). `RunLock` holds an exclusive lock on `<run>/.moerm.lock` for the
life of a training run or an `add-domain` (an OS file lock: the kernel releases it when the process ends, even on
`kill -9`, so a killed run never leaves a stale lock). A second process is refused at once, with one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import TracebackType
from typing import Literal

from moerm.errors import UserError

LOCK_FILE = ".moerm.lock"
RUN_MARKER = "config.yaml"  # written first by a run: a folder holding it is a moerm run
# What a run folder may hold before its config.yaml without being the user's: our lock, our error logs, the
# backbone record a start writes just before config.yaml (runs.BACKBONE_FILE)
_OURS = re.compile(r"^(\.moerm\.lock|last-error(\.rank\d+)?\.log|backbone\.json)$")

Kind = Literal["absent", "empty", "run"]


class RunFolderError(UserError):
    """A run folder that cannot be used: the user's own files, a file instead of a folder, or in use."""


def inspect_run_folder(path: Path, option: str = "--out") -> Kind:
    """absent | empty (or only our lock/logs) | run; a folder of anything else, or a non-folder, is refused."""
    path = Path(path)
    try:
        if not path.exists() and not path.is_symlink():
            return "absent"
        if not path.is_dir():
            raise RunFolderError(f"{option} {path}: exists and is not a folder; choose another {option}")
        if (path / RUN_MARKER).is_file():
            return "run"
        foreign = sorted(p.name for p in path.iterdir() if not _OURS.match(p.name))
    except OSError as e:  # a symlink loop, a permission
        raise RunFolderError(f"{option} {path}: cannot be used as a run folder ({e.strerror or e})") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFolderError(f"{option} {path}: this folder is not empty and holds no moerm run ({shown}); nothing "
                             f"was written. Choose a new or empty folder for {option}")
    return "empty"


def check_seeds_folder(path: Path, option: str = "--out") -> None:
    """`--seeds` trains into OUT/seed-N: OUT may be absent, empty or hold seed-* folders, never other files."""
    path = Path(path)
    try:
        if not path.exists() and not path.is_symlink():
            return
        if not path.is_dir():
            raise RunFolderError(f"{option} {path}: exists and is not a folder; choose another {option}")
        foreign = sorted(p.name for p in path.iterdir()
                         if not _OURS.match(p.name) and not (p.name.startswith("seed-") and p.is_dir()))
    except OSError as e:
        raise RunFolderError(f"{option} {path}: cannot be used as a run folder ({e.strerror or e})") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunFolderError(f"{option} {path}: with --seeds this folder may only hold seed-* runs, but it holds "
                             f"{shown}; nothing was written. Choose a new or empty folder for {option}")


def lock_folder(model_dir: Path) -> Path:
    """The folder whose lock guards a saved model: its run folder (where training holds the lock) when the model
    is a run's `model/`, else the model folder itself (never a folder above it that is not ours)."""
    run = model_dir.parent
    return run if model_dir.name == "model" and (run / RUN_MARKER).is_file() else model_dir


class RunLock:
    """An exclusive, non-blocking lock on `<folder>/.moerm.lock` (created with the folder if needed).

    Used as a context manager; `RunFolderError` when another process holds it. The lock file itself stays (an empty
    file): deleting it would let a process that opened the old file and one that creates a new one both "hold" it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{self.folder}: in use by another moerm process (a training run or add-domain "
                                 f"holds {LOCK_FILE}); wait for it to end, or choose another folder") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _lock(fd: int) -> None:
    """Exclusive and non-blocking; BlockingIOError when held elsewhere."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
