"""runnel's load generator: trio + h11 (no code shared with the server it measures).

    from benchmarks.loadgen import LoadSpec, Workload, run_load
    report = run_load(Workload("http://127.0.0.1:8000/health"), LoadSpec(concurrency=8, duration=5))

Command line: ``python -m benchmarks.loadgen --help``; see README.md beside this file.
"""

from .client import LoadSpec, Workload, load, parse_url, run_load
from .report import format_table
from .stats import percentile, summarize

__all__ = ["LoadSpec", "Workload", "format_table", "load", "parse_url", "percentile", "run_load", "summarize"]
