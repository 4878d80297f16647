"""runnel's load generator: trio + h11 (no code shared with the server it measures).

    from benchmarks.loadgen import LoadSpec, Workload, run_load   # installed: from runnel_loadgen import ...
    report = run_load(Workload("http://127.0.0.1:8000/health"), LoadSpec(concurrency=8, duration=5))

Command line: ``runnel-loadgen --help`` (installed) or ``python -m benchmarks.loadgen --help``;
see README.md beside this file.
"""

from .client import LoadSpec, Workload, arrival_offsets, load, parse_url, run_load
from .dataset import Lengths, Sample, fixed, load_sharegpt, synthetic
from .metrics import meets, parse_slos, request_metrics
from .report import format_table
from .stats import percentile, summarize

__all__ = ["Lengths", "LoadSpec", "Sample", "Workload", "arrival_offsets", "fixed", "format_table", "load",
           "load_sharegpt", "meets", "parse_slos", "parse_url", "percentile", "request_metrics", "run_load",
           "summarize", "synthetic"]
