"""``runnel serve | check-config | plugins``."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import signal
import sys

from .config import LOG_LEVELS, Config, ConfigError, ServerConfig, apply_environment, load_config, override_server
from .plugins import describe_plugins, make_plugin_manager
from .server import Server
from .supervisor import report_listening, serve_workers, watch_supervisor, worker_slot
from .workers import exit_past_running_calls

logger = logging.getLogger("runnel")


def run(coro):
    """Run a coroutine on uvloop, or on plain asyncio where uvloop cannot load."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# What `runnel serve` with no config says: where a config that serves the built-in model is.
NO_CONFIG_HINT = (
    "no config given (--config or $RUNNEL_CONFIG): serving no apps. To serve the built-in model, "
    "start `runnel serve --config conf/runnel.toml` from a runnel checkout, or write a config with "
    "[apps.tiny] backend = \"ctranslate2\", model = \"builtin:tiny\" (see conf/examples/openai.toml)"
)


def _version() -> str:
    try:
        return importlib.metadata.version("runnel")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _load(path: str | None, args=None) -> Config:
    path = path or os.environ.get("RUNNEL_CONFIG", "").strip() or None
    config = load_config(path) if path else Config()
    config = apply_environment(config, os.environ)
    if args is not None:
        config = override_server(config, host=args.host, port=args.port, log_level=args.log_level,
                                 workers=args.workers)
    return config


async def _serve(server: Server) -> None:
    await server.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []
    orphaned: asyncio.Task[None] | None = None
    if server.worker is None:
        logger.info("runnel listening on %s", server.url)
    else:
        logger.info("runnel worker %d (pid %d) listening on %s", server.worker.index, os.getpid(), server.url)
        report_listening(server.worker)
        orphaned = loop.create_task(watch_supervisor(server.stop))

    def on_signal(signum: int) -> None:
        if stopping:
            logger.warning("second %s: stopping now", signal.Signals(signum).name)
            server.force_stop()
            return
        logger.info("%s: finishing in-flight requests (up to %ss)", signal.Signals(signum).name,
                    server.config.server.shutdown_grace)
        stopping.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.serve_forever()
    if orphaned is not None:
        orphaned.cancel()
    logger.info("runnel stopped")


def cmd_serve(args) -> int:
    config = _load(args.config, args)
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    slot = worker_slot()
    if config.source is None and not config.apps and (slot is None or slot.index == 0):
        logger.warning("%s", NO_CONFIG_HINT)
    if slot is None and config.server.workers > 1:
        return serve_workers(config, run)
    server = Server(config, worker=slot)
    server.build()  # config mistakes are reported before anything binds
    run(_serve(server))
    exit_past_running_calls(0)  # a batch abandoned at shutdown must not crash the exit
    return 0


def cmd_check_config(args) -> int:
    config = _load(args.file)
    Server(config).build()
    print(f"{args.file}: ok ({len(config.apps)} app{'s' if len(config.apps) != 1 else ''}, auth {config.auth.kind})")
    return 0


def cmd_plugins(args) -> int:
    for row in describe_plugins(make_plugin_manager()):
        print(f"{row['name']}\t{row['distribution']}\t{', '.join(row['hooks'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runnel", description="A self-hosted inference HTTP server.")
    parser.add_argument("--version", action="version", version=f"runnel {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = ServerConfig()
    serve = commands.add_parser(
        "serve", help="run the server", description="Run the server until SIGTERM or SIGINT.",
        epilog="Precedence: built-in defaults, then the config file, then RUNNEL_* variables, then these flags.",
    )
    serve.add_argument("--config", metavar="FILE",
                       help="TOML config file (default: $RUNNEL_CONFIG; with neither, no apps are served)")
    serve.add_argument("--host", help=f"address to listen on (default: $RUNNEL_HOST, else [server] host, "
                       f"else {defaults.host})")
    serve.add_argument("--port", type=int, help=f"port to listen on, 0 = any free one (default: $RUNNEL_PORT, "
                       f"else [server] port, else {defaults.port})")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help=f"log verbosity (default: $RUNNEL_LOG_LEVEL, "
                       f"else [server] log_level, else {defaults.log_level})")
    serve.add_argument("--workers", type=int, metavar="N", help=f"processes serving the port, each with its own "
                       f"event loop and apps (default: $RUNNEL_WORKERS, else [server] workers, "
                       f"else {defaults.workers})")
    serve.set_defaults(func=cmd_serve)
    check = commands.add_parser("check-config", help="validate a config file and the plugins it names")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    plugins = commands.add_parser("plugins", help="list installed and built-in plugins")
    plugins.set_defaults(func=cmd_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"runnel: config error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the port is taken
        print(f"runnel: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
