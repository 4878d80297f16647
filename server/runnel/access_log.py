"""Built-in plugin: one log line per finished request when ``[server] access_log`` is on."""

import logging

from .hookspecs import hookimpl

logger = logging.getLogger("runnel.access")


class AccessLog:
    @hookimpl
    def runnel_request_finished(self, request, status, elapsed):
        client = request.client
        logger.info(
            '%s - "%s %s" %d %.1fms id=%s',
            f"{client[0]}:{client[1]}" if client else "-",
            request.method,
            request.target.decode("latin-1"),
            status,
            elapsed * 1000,
            request.request_id,
        )
