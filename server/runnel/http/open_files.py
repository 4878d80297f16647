"""The process's open-file limit, and the connection cap that keeps us under it.

Every connection is a descriptor. At the common soft limit of 1024, a thousand idle
or trickling connections made ``accept()`` fail and every other client with it. So
at start-up the soft ``RLIMIT_NOFILE`` is raised to the hard limit (what an
unprivileged process may do; Go's runtime does the same), and ``max_connections``
defaults to most of it: the rest is left for the files, models, logs and the run
store the process also opens, and for answering refused connections.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # not a Unix: the OS has no such limit to raise
    resource = None  # type: ignore[assignment]

logger = logging.getLogger("runnel.http")

# Where the hard limit is "unlimited", the most Linux (fs.nr_open's default) and macOS (OPEN_MAX) allow.
_UNLIMITED_CANDIDATES = (1 << 20, 10240)
# Descriptors kept back from connections: at least this many, and a tenth of the limit.
_RESERVE = 64


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard limit; return the soft limit now in force.

    Never fails: where the limit cannot be raised (a container's seccomp policy, an
    OS without rlimits) it is logged and kept. None where there is no such limit.
    """
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as error:
        logger.warning("cannot read the open-file limit: %s", error)
        return None
    if soft == hard:
        return _finite(soft)
    candidates = _UNLIMITED_CANDIDATES if hard == resource.RLIM_INFINITY else (hard,)
    problem: Exception | None = None
    for target in candidates:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as error:
            problem = error
            continue
        logger.info("raised the open-file limit from %s to %d", soft, target)
        return target
    if problem is not None:
        logger.warning("could not raise the open-file limit above %s (hard limit %s): %s", soft, hard, problem)
    return _finite(soft)


def _finite(limit: int) -> int:
    return _UNLIMITED_CANDIDATES[0] if resource is not None and limit == resource.RLIM_INFINITY else limit


def connection_cap(configured: int, open_files: int | None) -> int:
    """The max_connections in force: ``configured``, or (0) what the open-file limit leaves room for.

    0 back means no cap (no open-file limit to stay under and none configured).
    """
    if open_files is None:
        return configured
    room = open_files - max(_RESERVE, open_files // 10)
    if not configured:
        return max(1, room)
    if configured > room:
        logger.warning("max_connections %d is more than the open-file limit (%d) leaves room for (%d): "
                       "the process may run out of descriptors before it refuses connections",
                       configured, open_files, room)
    return configured
