"""`nexus-tune serve`: check the address, build the engine (nexus_tune/engine/llm.py) and its OpenAI-compatible
app (nexus_tune/engine/server.py), and serve until SIGTERM/SIGINT, draining open requests first.
"""
from __future__ import annotations
import argparse
import logging
import socket
from nexus_tune.engine.server import build_app, serve

def _check_listen(host: str, port: int) -> None:
    """Bind the address and let it go: a taken port or an unknown host fails here (OSError),
    before the model loads, rather than in uvicorn after it."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no refusal
        sock.bind((host, port))


def run_serve(args: argparse.Namespace) -> int:
    """`nexus-tune serve`: load the model, then serve until interrupted (a graceful drain, see
    DrainingServer). The CLI checked each flag."""
    from nexus_tune.engine.llm import AsyncLLM, EngineError
    from nexus_tune.commands.cli import report_error

    try:
        _check_listen(args.host, args.port)
    except OSError as exc:
        report_error(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = AsyncLLM(args.model, policy=args.policy, device=args.device, profile=args.profile,
                          max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed, slo=args.slo)
    except EngineError as exc:
        report_error(str(exc))
        return 2
    app = build_app(engine, args.served_model_name or args.model, args.max_queue, args.shutdown_timeout)
    serve(app, args.host, args.port)
    return 0
