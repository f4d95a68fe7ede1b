"""What every `moerm` command shares: the consoles, the one error helper, the guarded runner, the shared option
types (`--on-invalid`, data paths, `--split`, `--set`), `--seeds` parsing and the reproducible command line.

The error rule (see `moerm.errors`): input the user can fix - `UserError` (ConfigError, DataError, InvalidRecord,
ServeConfigError, JudgeConfigError, ...), `BackboneError`, `OSError` (a missing file, a permission, a corrupt .gz),
`EOFError` (a truncated .gz) and safetensors' I/O failures (a full disk) - is one red line and exit code 1. Anything
else is a bug of ours: one line naming it, the full traceback saved to a log file (and printed with `moerm --debug
...` or MOERM_DEBUG=1), exit code 2.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Collection
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from moerm.errors import UserError

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 2
DEBUG_ENV = "MOERM_DEBUG"
ERROR_LOG = "last-error.log"

T = TypeVar("T")


# -- shared option types

class OnInvalid(str, Enum):
    """What to do with an invalid record."""

    error = "error"
    skip = "skip"


class Split(str, Enum):
    """Which files a folder contributes (by file name prefix)."""

    train = "train"
    test = "test"


PATHS_HELP = "Files, folders, saved `datasets` folders or hf:<name>[:<split>]."


def on_invalid_option(default: OnInvalid | None = OnInvalid.error, help: str | None = None) -> Any:
    """`--on-invalid error|skip`; default None means "the config's data.on_invalid"."""
    return typer.Option(default, "--on-invalid", help=help or "stop at the first invalid record (error) or skip and "
                        "count it (skip)")


def data_option(help: str, required: bool = True) -> Any:
    """`--data PATH` (repeatable): files, folders (train*/test* files inside), saved `datasets` folders, hf:<name>."""
    return typer.Option(... if required else None, "--data", help=help)


def paths_argument() -> Any:
    """The data paths of `moerm data` / `moerm label` (positional)."""
    return typer.Argument(..., help=PATHS_HELP)


def split_option() -> Any:
    return typer.Option(None, "--split", help="Only take train or test files from folders.")


def set_option(example: str = "--set train.lr=1e-4") -> Any:
    """`--set key=value` (repeatable): a config override, the value read as YAML."""
    return typer.Option(None, "--set", help=f"config override key=value (value read as YAML), e.g. {example}")


def parse_seeds(text: str | None, option: str = "--seeds") -> list[int] | None:
    """'0,1, 2' -> [0, 1, 2]; None -> None; a bad or repeated seed is a UserError naming it."""
    if text is None:
        return None
    seeds: list[int] = []
    for part in text.split(","):
        s = part.strip()
        if not s:
            continue
        try:
            seed = int(s)
        except ValueError:
            raise UserError(f"{option}: {s!r} is not an integer seed; give comma-separated integers, "
                            f"e.g. {option} 0,1,2") from None
        if not 0 <= seed <= 2**32 - 1:  # what numpy's and torch's seeding accept (config.MAX_SEED)
            raise UserError(f"{option}: seed {s if len(s) <= 24 else s[:20] + '...'} is outside 0..{2**32 - 1}")
        if seed in seeds:
            raise UserError(f"{option}: seed {seed} is given twice")
        seeds.append(seed)
    if not seeds:
        raise UserError(f"{option}: no seed in {text!r}; give comma-separated integers, e.g. {option} 0,1,2")
    return seeds


def check_batch_size(value: int, option: str = "--batch-size") -> None:
    """A batch size below 1 would score nothing (-1) or crash (0): refused, naming the option."""
    if value < 1:
        raise UserError(f"{option} must be >= 1, got {value}")


# -- the reproducible command line

def _flag(param: Any) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def _text(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def command_line(ctx: typer.Context, exclude: Collection[str] = ("progress",), program: str = "moerm") -> str:
    """The command as one shell line, rebuilt from what was given on the command line (not from sys.argv, which
    is not ours when the CLI is embedded or launched by torchrun), for a run's command.txt.

    Every option or argument the user gave is kept (defaults are not: the run's resolved config records those),
    in declaration order; `exclude` names parameters that do not change the result (e.g. progress bars).
    """
    names = []
    c: Any = ctx
    while c is not None and c.parent is not None:  # the root's info_name is the program, whatever launched it
        names.append(c.info_name or "")
        c = c.parent
    parts = [program, *reversed(names)]
    given = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # ParameterSource names (click's, or typer's own copy)
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in exclude or source is None or source.name not in given:
            continue
        value = ctx.params.get(name)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            parts += [_text(v) for v in values]
        elif getattr(param, "is_flag", False) and isinstance(value, bool):
            if param.secondary_opts:
                parts.append(_flag(param) if value else param.secondary_opts[0])
            elif value:
                parts.append(_flag(param))
        else:
            for v in values:
                parts += [_flag(param), _text(v)]
    return shlex.join(parts)


# -- errors

def fail(msg: object, code: int = EXIT_USER_ERROR) -> NoReturn:
    """The one error helper: 'error: MSG' on stderr (no markup read from MSG), then exit `code`."""
    text = str(msg) or type(msg).__name__
    err.print(Text.assemble(("error:", "bold red"), " ", text))
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is enough for the user to fix the input (see the module docstring)."""
    # BackboneError can only have been raised if its module is loaded; importing it here would load transformers
    backbone = sys.modules.get("moerm.encoding.backbone")
    return (UserError, OSError, EOFError, *((backbone.BackboneError,) if backbone is not None else ()))


_OS_ERROR_TEXT = re.compile(r"I/O error|IoError|\(os error \d+\)")


def environment_error(e: BaseException) -> bool:
    """The machine's fault, not ours, arriving as another type than OSError: safetensors reports a full disk or a
    refused write as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    return type(e).__name__ == "SafetensorError" and bool(_OS_ERROR_TEXT.search(str(e)))


_debug = False  # `moerm --debug`, for the one invocation (the root callback sets it and resets it on close)


def set_debug(ctx: typer.Context, on: bool) -> None:
    global _debug
    _debug = on
    ctx.call_on_close(set_debug_off)


def set_debug_off() -> None:
    global _debug
    _debug = False


def debug_enabled() -> bool:
    """`moerm --debug ...` or MOERM_DEBUG=1 (any value but '', 0, false, no)."""
    if _debug:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_log_path(run_dir: Path | None = None) -> Path:
    """Where an internal error's traceback goes: the run folder when it exists, else $MOERM_CACHE (default
    ~/.cache/moerm). Under torchrun every process but rank 0 writes its own file."""
    rank = os.environ.get("RANK", "0")
    name = ERROR_LOG if rank in ("", "0") else f"last-error.rank{rank}.log"
    if run_dir is not None and Path(run_dir).is_dir():
        return Path(run_dir) / name
    return Path(os.environ.get("MOERM_CACHE", Path.home() / ".cache" / "moerm")) / name


def _save_traceback(tb: str, run_dir: Path | None) -> Path | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("moerm")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        ours = "?"
    header = (f"moerm {ours}, python {sys.version.split()[0]}, {dt.datetime.now().isoformat(timespec='seconds')}\n"
              f"argv: {shlex.join(sys.argv)}\n\n")
    candidates = [error_log_path(run_dir)]
    if run_dir is not None:
        candidates.append(error_log_path(None))
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(header + tb)
            return path
        except OSError:
            continue
    return None


def internal_error(e: BaseException, run_dir: Path | None = None) -> NoReturn:
    """A bug of ours: one line naming it, the traceback saved (and printed when debugging), exit code 2."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    path = _save_traceback(tb, run_dir)
    first = (str(e).splitlines() or [""])[0]
    err.print(Text.assemble(("error:", "bold red"), f" internal error (a bug in moerm, not in your input): "
                            f"{type(e).__name__}{': ' + first if first else ''}"))
    if debug_enabled():
        sys.stderr.write(tb)
        sys.stderr.flush()
    where = f"full traceback in {path}" if path is not None else "the traceback could not be saved"
    err.print(f"{where}; rerun with --debug (or {DEBUG_ENV}=1) to print it, and please report it")
    raise typer.Exit(EXIT_INTERNAL_ERROR)


# how a command ends on purpose (`fail`, typer.Exit / Abort): never reported as a bug
_PASS_THROUGH = (typer.Exit, typer.Abort)


def run_guarded(fn: Callable[[], T], run_dir: Path | None = None) -> T:
    """Run a command body: user errors become one red line (exit 1), anything else `internal_error` (exit 2).

    `run_dir`: the command's output folder, where an internal error's traceback is saved if the folder exists.
    """
    try:
        return fn()
    except _PASS_THROUGH:
        raise  # typer.Exit is a RuntimeError: `fail` inside `fn` must pass through
    except user_errors() as e:
        fail(e)
    except Exception as e:  # noqa: BLE001 - the point: a bug is reported, not hidden, and not a raw traceback
        if environment_error(e):
            fail(f"a file could not be written or read: {e} ({type(e).__name__}); free disk space or fix the "
                 "folder's permissions, then run again (training resumes with --resume)")
        internal_error(e, run_dir)


def quiet_hf() -> None:
    """No transformers progress bars or warnings on the console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
