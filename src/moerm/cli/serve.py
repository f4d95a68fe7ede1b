"""`moerm serve`: a reward system over HTTP with dynamic batching."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.text import Text

from moerm.cli.common import err, quiet_hf, run_guarded
from moerm.serve.config import ServeConfig

# Every option's default is ServeConfig's own, so the CLI and the library never disagree.
DEFAULT = {f.name: f.default for f in dataclasses.fields(ServeConfig)}

API_KEY_IN_PS = ("--api-key is visible to every user of this machine (ps, /proc) and stays in shell history; "
                 "prefer $MOERM_API_KEY or --api-key-file PATH")


def serve(
    run: Path = typer.Argument(..., help="run folder or saved model folder"),
    host: str = typer.Option(DEFAULT["host"], "--host"),
    port: int = typer.Option(DEFAULT["port"], "--port"),
    max_batch: int = typer.Option(DEFAULT["max_batch"], "--max-batch", help="most items scored together"),
    max_wait_ms: float = typer.Option(DEFAULT["max_wait_ms"], "--max-wait-ms", help="how long a request may wait for others to join"),
    no_batching: bool = typer.Option(False, "--no-batching", help="score each request alone"),
    max_queue: int = typer.Option(DEFAULT["max_queue"], "--max-queue", help="most items waiting; past it: 503 + Retry-After"),
    max_items: int = typer.Option(DEFAULT["max_items_per_request"], "--max-items", help="most items per request (413 past it)"),
    max_chars: int = typer.Option(DEFAULT["max_chars_per_text"], "--max-chars", help="most characters per text (413 past it)"),
    max_request_chars: int = typer.Option(DEFAULT["max_request_chars"], "--max-request-chars",
                                          help="most characters in all texts of one request (413 past it)"),
    max_body_bytes: int = typer.Option(DEFAULT["max_body_bytes"], "--max-body-bytes",
                                       help="largest request body, refused (413) before it is read"),
    body_timeout_s: float = typer.Option(DEFAULT["body_timeout_s"], "--body-timeout-s",
                                         help="seconds a request body may take to arrive (408 past it)"),
    header_timeout_s: float = typer.Option(DEFAULT["header_timeout_s"], "--header-timeout-s",
                                           help="seconds a request head may take to arrive (then disconnected)"),
    max_connections: int = typer.Option(DEFAULT["max_connections"], "--max-connections",
                                        help="most open connections; past it the longest-waiting one is closed"),
    keep_alive_s: float = typer.Option(DEFAULT["keep_alive_s"], "--keep-alive-s", help="seconds an idle keep-alive connection stays open"),
    api_key: str | None = typer.Option(None, "--api-key", help="bearer token required on every request but "
                                       "/health; visible in ps: prefer $MOERM_API_KEY or --api-key-file"),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="file holding the bearer token "
                                             "(default: $MOERM_API_KEY; none: no auth)"),
    query_template: str = typer.Option(DEFAULT["query_template"], "--query-template", help="the policy's chat format, to split "
                                       "OpenRLHF queries: chatml | llama3 | hh | plain | auto (the run's backbone "
                                       "tokenizer) | tokenizer:PATH (the policy's tokenizer), or a string with "
                                       "{prompt} then {response}"),
    labels_as_domain: bool = typer.Option(False, "--labels-as-domain", help="read OpenRLHF's labels[i] as query "
                                          "i's domain: a domain name, or a JSON object with \"domain\""),
    batch_size: int = typer.Option(DEFAULT["batch_size"], "--batch-size", help="forward batch size inside one scoring call (with "
                                   "--max-batch-tokens: the most rows of one forward pass)"),
    max_batch_tokens: int | None = typer.Option(None, "--max-batch-tokens", help="token budget of one forward pass: "
                                                "pairs sorted by length, each pass at most this many padded tokens "
                                                "(default: passes of --batch-size rows)"),
    reload_poll_s: float = typer.Option(DEFAULT["reload_poll_s"], "--reload-poll-s", help="seconds between checks of the run folder for a "
                                        "new saved version (moerm add-domain), swapped in without a restart; 0: off"),
    model_name: str | None = typer.Option(None, "--model-name", help="the `model` /classify, /pooling and "
                                          "/v1/embeddings answer with (default: the run folder's name)"),
    ray: bool = typer.Option(False, "--ray", help="serve with Ray Serve (pip install 'moerm[ray]'): --replicas "
                             "copies behind Ray Serve's proxy on --host:--port, each with these settings"),
    replicas: int = typer.Option(1, "--replicas", help="with --ray: how many replicas"),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="with --ray: CPUs reserved per replica"),
    replica_gpus: float = typer.Option(0.0, "--replica-gpus", help="with --ray: GPUs per replica (0.5: two per GPU)"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    torch_threads: int | None = typer.Option(None, "--torch-threads", help="torch CPU threads (default: torch's)"),
    quantize: str | None = typer.Option(None, "--quantize", help="none | int8: int8 dynamic quantization of the "
                                        "backbone after loading (CPU only; default: the saved model.quantize)"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a reward system over HTTP (POST /v1/score, OpenRLHF's /get_reward) with dynamic batching."""
    from moerm.serve.config import ServeConfig, ServeConfigError
    from moerm.serve.server import run_server
    from moerm.systems.base import find_model_dir

    quiet_hf()

    def go() -> None:
        find_model_dir(run)  # a wrong folder fails here, not after the server is up
        cfg = ServeConfig(host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, batching=not no_batching,
                          max_queue=max_queue, max_items_per_request=max_items, max_chars_per_text=max_chars,
                          max_request_chars=max_request_chars, max_body_bytes=max_body_bytes,
                          body_timeout_s=body_timeout_s, header_timeout_s=header_timeout_s,
                          max_connections=max_connections, keep_alive_s=keep_alive_s, api_key=api_key,
                          api_key_file=str(api_key_file) if api_key_file is not None else None,
                          query_template=query_template, labels_as_domain=labels_as_domain,
                          batch_size=batch_size, device=device,
                          torch_threads=torch_threads, quantize=quantize, max_batch_tokens=max_batch_tokens,
                          reload_poll_s=reload_poll_s, model_name=model_name)
        if api_key:
            err.print(Text.assemble(("warning:", "bold yellow"), " ", API_KEY_IN_PS))
        if ray:
            from moerm.serve.ray_serve import ReplicaSpec, run_ray

            run_ray(str(run), cfg, ReplicaSpec(replicas, replica_cpus, replica_gpus))
            return
        if replicas != 1:
            raise ServeConfigError("--replicas needs --ray (one process serves one replica)")
        run_server(str(run), cfg, log_level=log_level)

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.command()(serve)
