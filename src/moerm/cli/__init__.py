"""The `moerm` command line: thin wrappers that parse options and call the library.

    common.py  consoles, the error rule and guarded runner, shared option types, the reproducible command line
    train.py   moerm train | eval | info | score | add-domain
    serve.py   moerm serve
    bench.py   moerm bench
    hub.py     moerm import-hf | export
    bon.py     moerm bon
    data.py    moerm data validate | stats | convert
    label.py   moerm label aspects | judge

`python -m moerm.cli ...` runs it too (that is how torchrun / accelerate launch start `moerm train`).
"""

from __future__ import annotations

import typer

from moerm.cli import bench, bon, hub, serve, train
from moerm.cli.common import DEBUG_ENV, set_debug
from moerm.cli.data import data_app
from moerm.cli.label import label_app
from moerm.cpu_memory import keep_cpu_memory

app = typer.Typer(help="Train, evaluate and serve domain-robust reward models (routers and mixtures of experts).",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help=f"on an internal error (a bug, exit code 2) print the "
                                     f"full traceback, not only where it was saved; also {DEBUG_ENV}=1")) -> None:
    set_debug(ctx, debug)
    keep_cpu_memory()  # every command's forward passes reuse freed memory (moerm.cpu_memory)


train.register(app)
serve.register(app)
bench.register(app)
hub.register(app)
bon.register(app)
app.add_typer(data_app, name="data")
app.add_typer(label_app, name="label")


def main() -> None:  # pragma: no cover - the console script calls `app` itself
    app()


__all__ = ["app", "main"]
