"""benchmarks/gpu/run.sh end to end on the CPU, so the GPU check keeps working between GPU loans.

--cpu runs every step the GPU run does but the cuBLAS one (tiny model, short runs); without
--cpu on a machine with no GPU, the cuBLAS step fails and the script must stop cleanly,
saying so. Both are bounded: the script's own loops are time-boxed, and so is each run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ctranslate2
import pytest

RUN = Path(__file__).with_name("run.sh")


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(RUN), "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_cpu_mode_runs_every_step_and_writes_the_report(tmp_path):
    done = run(tmp_path, "--cpu", "--tokens", "16", "--seconds", "0.25", "--variant", "max_batch_size = 4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["cpu"] and "stopped" not in data and "cublas" not in data
    assert data["model"]["parameters"] > 0
    assert set(data["in_process"]) == {"float32", "int8"}
    for result in data["in_process"].values():
        assert [int(b) for b in result["points"]] == [1, 8, 16, 32, 64, 128]
        assert all(point["tokens_per_s"] > 0 for point in result["points"].values())
    points = data["runnel"]["points"]
    assert [int(s) for s in points] == [1, 16, 64, 128]
    assert all(not point["errors"] for point in points.values()), points
    assert points["1"]["requests"] > 0 and points["1"]["ttft_ms"]["p50"] > 0
    # The server ran with the device's defaults, and says which.
    app = data["runnel"]["app"]
    assert " on cpu (float32), " in app and app.endswith(" threads, batches of up to 16 rows, 2 ms window"), app
    # A variant is served once more with its setting on top of the defaults, and reported apart.
    [variant] = data["variants"]
    assert variant["setting"] == "max_batch_size = 4" and "batches of up to 4 rows" in variant["app"], variant
    assert [int(s) for s in variant["points"]] == [1, 16, 64, 128]
    assert all(not point["errors"] and point["tokens_per_s"] > 0 for point in variant["points"].values())
    report = (tmp_path / "gpu.md").read_text()
    assert "with `max_batch_size = 4`" in report
    assert "| 128 |" in report and "runnel / in-process" in report and "| float32 (float32) |" in report
    assert (tmp_path / "run.log").read_text().count("in-process") >= 12


@pytest.mark.skipif(ctranslate2.get_cuda_device_count() > 0, reason="this machine has a GPU")
def test_without_a_usable_cublas_it_stops_saying_so(tmp_path):
    done = run(tmp_path)
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["cublas"]["ok"] is False and "model" not in data
    report = (tmp_path / "gpu.md").read_text()
    assert "**does not work**" in report and "no CUDA GPU is visible to CTranslate2" in report
    assert "**Stopped**: CTranslate2 cannot use this machine's GPU and cuBLAS" in report
    assert (tmp_path / "nvidia-smi.txt").exists()
