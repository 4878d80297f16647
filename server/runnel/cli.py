"""``runnel serve | check-config | plugins``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from .config import Config, ConfigError, apply_environment, load_config, override_server
from .plugins import describe_plugins, make_plugin_manager
from .server import Server

logger = logging.getLogger("runnel")


def run(coro):
    """Run a coroutine on uvloop, or on plain asyncio where uvloop cannot load."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _load(path: str | None, args=None) -> Config:
    path = path or os.environ.get("RUNNEL_CONFIG")
    config = load_config(path) if path else Config()
    config = apply_environment(config, os.environ)
    if args is not None:
        config = override_server(config, host=args.host, port=args.port, log_level=args.log_level)
    return config


async def _serve(server: Server) -> None:
    await server.start()
    logger.info("runnel listening on %s", server.url)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

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
    logger.info("runnel stopped")


def cmd_serve(args) -> int:
    config = _load(args.config, args)
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server = Server(config)
    server.build()  # config mistakes are reported before anything binds
    run(_serve(server))
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
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML config file (default: $RUNNEL_CONFIG, else built-in defaults)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
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
