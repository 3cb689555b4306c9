"""`nanoflow serve`: arguments and the uvicorn runner (heavy imports only when it runs)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", action="append", default=None,
                   help="name(s) clients use in `model` (default: the --model value or file name)")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="waiting-queue bound; further requests get 429 until it drains")
    g.add_argument("--log-level", default="info")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests may still run before they end with an error")
    g.add_argument("--max-request-body-bytes", type=int, default=16 << 20,
                   help="larger request bodies get 413")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from nanoflow.config import engine_config_from_args
    from nanoflow.engine.data_parallel import make_engine
    from nanoflow.server.app import build_app
    if args.max_waiting < 1:
        raise ValueError("--max-waiting must be at least 1")
    from nanoflow.server.lifecycle import GracefulServer
    if args.max_request_body_bytes < 1:
        raise ValueError("--max-request-body-bytes must be at least 1")
    engine = make_engine(engine_config_from_args(args))  # --data-parallel-size N: N replica processes
    app = build_app(engine, args.served_model_name, args.max_waiting, args.max_request_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    try:
        GracefulServer(config, app, args.shutdown_timeout).run()
    finally:
        engine.shutdown()
    return 0
