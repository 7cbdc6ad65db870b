"""`moa serve`: MoAs over HTTP (OpenAI-compatible API, LangServe, inspector)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from langchain_moa.cli import output
from langchain_moa.cli.options import (
    _layers,
    _non_negative,
    _port,
    _positive,
    _seconds,
    _temperature,
    add_run_shape_options,
    chat_moa_for,
)
from langchain_moa.cli.output import EXIT_OK
from langchain_moa.errors import ConfigError, install_command
from langchain_moa.redaction import install_log_redaction, register_secrets


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def served_models(args: argparse.Namespace) -> dict[str, Any]:
    """One ChatMoA per --recipe / --config, keyed by the recipe's or the config's name."""
    sources = [*(args.recipe or []), *(args.config or [])] or ["local"]
    models: dict[str, Any] = {}
    for source in sources:
        name, moa = chat_moa_for(source, args)
        if name in models:
            raise ConfigError(
                f"two served MoAs are both named {name!r}; give one a different "
                "name = ... in its config file"
            )
        models[name] = moa
    return models


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve MoAs over HTTP: OpenAI-compatible API, LangServe at /moa, inspector at /."""
    try:
        import langserve  # noqa: F401  (the /moa routes are part of what `moa serve` serves)
        import uvicorn

        from langchain_moa.server import (
            API_KEY_ENV,
            MIN_SERVE_KEY,
            ServeLimits,
            create_app,
            local_run_bound,
        )
    except ImportError:
        raise ConfigError(f"serving needs the 'serve' extra: {install_command('serve')}") from None
    api_key = os.environ.get(API_KEY_ENV) or None
    public = not _is_loopback(args.host)
    if public and api_key is None and not args.allow_public:
        raise ConfigError(
            f"refusing to serve on {args.host} without a key: set {API_KEY_ENV}, or pass "
            "--allow-public to serve it to anyone who can reach this machine"
        )
    if public and api_key is not None and len(api_key) < MIN_SERVE_KEY:
        raise ConfigError(
            f"{API_KEY_ENV} is {len(api_key)} characters: a key for a public host needs at "
            f"least {MIN_SERVE_KEY} (e.g. python -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )
    if api_key is not None:
        register_secrets([api_key])
    listener = _listen(args.host, args.port)  # before the models load (seconds for local)
    try:
        models = served_models(args)
    except BaseException:
        listener.close()
        raise
    max_runs, why = args.max_runs, "--max-runs"
    if max_runs is None:
        max_runs, why = 16, "default"
        bound = local_run_bound(models)
        if bound is not None and bound[0] < max_runs:
            max_runs, why = bound
    limits = ServeLimits(
        max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
        max_runs=max_runs, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
    )  # fmt: skip
    app = create_app(models, api_key=api_key, limits=limits)
    base = f"http://{args.host}:{args.port}"
    output.err.print(
        f"serving {', '.join(models)} at {base}/v1 (OpenAI API), {base}/moa (LangServe: "
        f"invoke, stream, batch), inspector at {base}/" + (" (key required)" if api_key else ""),
        markup=False,
    )
    output.err.print(
        f"limits: {max_runs} run{'' if max_runs == 1 else 's'} at once ({why}), "
        f"{args.max_queue} queued, "
        f"{args.request_timeout:g} s per request",
        markup=False,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning",
        access_log=False,  # the app's own access log (langchain_moa.access) has one line each
        # connections beyond this get 503 before reaching the app; idle keep-alive
        # connections close after 5 s (slow bodies: the app's --body-timeout)
        limit_concurrency=args.max_connections, timeout_keep_alive=5,
    )  # fmt: skip
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # configured by Config
        install_log_redaction(logging.getLogger(name))
    logging.getLogger("langchain_moa.access").setLevel(logging.INFO)
    uvicorn.Server(config).run(sockets=[listener])
    return EXIT_OK


def _listen(host: str, port: int) -> Any:
    """The server's listening socket, bound now: a port in use or a host this machine does
    not have is a one-line user error (exit 2) before any model loads."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        raise ConfigError(
            f"cannot serve on {host}:{port}: {why}; pass a free --port, or a --host this "
            "machine has"
        ) from None
    sock.set_inheritable(True)
    return sock


def register(sub: Any) -> None:
    """Add `moa serve` to the `moa` parser."""
    serve = sub.add_parser(
        "serve", help="serve MoAs: OpenAI-compatible API, LangServe, inspector page"
    )
    serve.add_argument(
        "--recipe", action="append", metavar="NAME",
        help="serve this recipe as a model (repeatable; default: local)",
    )  # fmt: skip
    serve.add_argument(
        "--config", action="append", metavar="FILE",
        help="serve this config file as a model named by its 'name' (repeatable; default: none)",
    )  # fmt: skip
    serve.add_argument(
        "--layers", type=_layers, metavar="N",
        help="every MoA's number of layers (default: each recipe's)",
    )  # fmt: skip
    serve.add_argument(
        "--max-tokens", type=_positive, metavar="N",
        help="cap every model's answer at N tokens (default: each recipe's caps)",
    )  # fmt: skip
    serve.add_argument(
        "--temperature", type=_temperature, metavar="T",
        help="the aggregators' temperature when a request sets none (default: each recipe's)",
    )  # fmt: skip
    add_run_shape_options(serve, each="each recipe's")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, metavar="N",
                       help="TCP port, 1 to 65535; checked free before the models load "
                       "(default: 8000)")  # fmt: skip
    serve.add_argument(
        "--allow-public", action="store_true",
        help="serve a non-loopback host without MOA_SERVE_API_KEY, so anyone may use it "
        "(default: refused)",
    )  # fmt: skip
    serve.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                       help="largest request body (default: 1000000)")  # fmt: skip
    serve.add_argument("--max-batch", type=_positive, default=32,
                       help="most inputs in one /moa/batch (default: 32)")  # fmt: skip
    serve.add_argument("--max-runs", type=_positive, default=None,
                       help="MoA runs in flight across the server (default: 16, or what the "
                       "embedded local model's slots can serve)")  # fmt: skip
    serve.add_argument("--max-queue", type=_non_negative, default=64,
                       help="runs that may wait for a slot before 429 (default: 64)")  # fmt: skip
    serve.add_argument("--request-timeout", type=_seconds, default=300, metavar="S",
                       help="deadline of one request, queue included; past it the run stops "
                       "and the client gets 504 (default: 300)")  # fmt: skip
    serve.add_argument("--body-timeout", type=_seconds, default=30, metavar="S",
                       help="time a client has to send its request body; 408 after "
                       "(default: 30)")  # fmt: skip
    serve.add_argument("--max-connections", type=_positive, default=1000, metavar="N",
                       help="open connections before uvicorn answers 503 "
                       "(default: 1000)")  # fmt: skip
    serve.set_defaults(func=cmd_serve)
