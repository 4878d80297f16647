"""runnel: a self-hosted inference HTTP server on h11 and uvloop."""

from .auth import ANONYMOUS, Principal
from .config import Config, ConfigError, config_from_dict, load_config
from .errors import HTTPError
from .hookspecs import hookimpl
from .http import Request, Response, ResponseStream, json_response
from .server import Server

__all__ = [
    "ANONYMOUS",
    "Config",
    "ConfigError",
    "HTTPError",
    "Principal",
    "Request",
    "Response",
    "ResponseStream",
    "Server",
    "config_from_dict",
    "hookimpl",
    "json_response",
    "load_config",
]
