"""DeviceSettings.resolve: threads within the cores (a worker's share of them), a GPU per worker,
CUDA only where its libraries load, and the settings a GPU gets where the config sets none."""

from __future__ import annotations

import logging
import subprocess
import sys

import ctranslate2
import pytest
from ct2_reference import tiny_config
from runnel_ctranslate2 import cuda
from runnel_ctranslate2.apps import DeviceSettings

import runnel
from runnel.supervisor import WorkerSlot, worker_slot

MISSING = cuda.CublasStatus((), "CUDA 12 cuBLAS could not be loaded: libcublas.so.12 (...): not found. "
                                f"Install it with: {cuda.INSTALL_HINT}")


LOADED = cuda.CublasStatus(("libcublasLt.so.12", "libcublas.so.12"), None)


def gpus(monkeypatch, count: int, cublas: cuda.CublasStatus = LOADED):
    """A machine with ``count`` GPUs on which the cuBLAS libraries load (or fail, as ``cublas``)."""
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: count)
    monkeypatch.setattr(cuda, "cublas_status", lambda: cublas)


def settings(device="cpu", index=None, inter=0, intra=0) -> DeviceSettings:
    return DeviceSettings(device, index, "default", inter, intra)


@pytest.mark.parametrize(("cores", "inter", "intra"), [(1, 1, 1), (3, 2, 1), (8, 2, 4)])
def test_a_workers_cpu_threads_fit_its_share_of_the_cores(cores, inter, intra):
    resolved = settings().resolve(WorkerSlot(index=1, count=4, cores=cores))
    assert (resolved.device, resolved.inter_threads, resolved.intra_threads) == ("cpu", inter, intra)
    assert resolved.inter_threads * resolved.intra_threads <= cores
    # Threads the config sets are the config's, worker or not.
    assert settings(inter=3, intra=5).resolve(WorkerSlot(0, 4, cores)).inter_threads == 3


def test_workers_take_the_gpus_round_robin_unless_the_config_names_one(monkeypatch):
    gpus(monkeypatch, 2)
    assert [settings("auto").resolve(WorkerSlot(i, 4, 1)).device_index for i in range(4)] == [0, 1, 0, 1]
    assert settings("cuda").resolve(WorkerSlot(3, 4, 1)).device_index == 1
    assert settings("cuda", index=0).resolve(WorkerSlot(3, 4, 1)).device_index == 0
    assert settings("auto").resolve(None).device_index == 0  # one process: the first GPU, as before
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    assert settings("auto").resolve(WorkerSlot(3, 4, 1)) == settings("cpu", 0, 1, 1)


def test_worker_slot_comes_from_the_supervisors_environment():
    assert worker_slot({}) is None
    env = {"RUNNEL_WORKER_INDEX": "1", "RUNNEL_WORKER_COUNT": "2", "RUNNEL_WORKER_CORES": "4",
           "RUNNEL_WORKER_READY_FD": "7"}
    slot = worker_slot(env)
    assert slot == WorkerSlot(1, 2, 4, 7) and worker_slot(slot.environ()) == slot


def test_auto_falls_back_to_the_cpu_saying_why(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "runnel.ctranslate2")
    gpus(monkeypatch, 1, MISSING)
    assert settings("auto").resolve(WorkerSlot(0, 1, 2)) == settings("cpu", 0, 2, 1)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"device auto: running on the CPU: {MISSING.problem}"
    caplog.clear()
    gpus(monkeypatch, 0, MISSING)  # no GPU: the libraries are not even tried
    monkeypatch.setattr(cuda, "cublas_status", lambda: pytest.fail("cuBLAS loaded without a GPU"))
    assert settings("auto").resolve(WorkerSlot(0, 1, 2)).device == "cpu"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "device auto: running on the CPU: no CUDA GPU is visible")]


def test_cuda_that_cannot_load_its_libraries_is_an_error(monkeypatch):
    gpus(monkeypatch, 1, MISSING)
    with pytest.raises(cuda.CudaUnavailable) as caught:
        settings("cuda").resolve(None)
    assert str(caught.value) == f'device = "cuda": {MISSING.problem}'
    assert "libcublas.so.12" in str(caught.value) and 'pip install "runnel-ctranslate2[cuda]"' in str(caught.value)


def test_a_gpu_gets_one_batch_at_a_time_in_a_16_bit_type(monkeypatch, tiny_dir):
    gpus(monkeypatch, 1)
    resolved = settings("auto").resolve(None, model_dir=tiny_dir)  # tiny_dir: float32 weights
    assert resolved == DeviceSettings("cuda", 0, "float16", 1, 1)
    # What the config sets is kept.
    chosen = DeviceSettings("cuda", None, "int8_float16", 2, 0).resolve(None, model_dir=tiny_dir)
    assert (chosen.compute_type, chosen.inter_threads) == ("int8_float16", 2)
    # The CPU keeps CTranslate2's "default" (the saved type).
    assert settings("cpu").resolve(None, model_dir=tiny_dir).compute_type == "default"


@pytest.mark.parametrize(("count", "cublas", "reason"), [
    (1, MISSING, MISSING.problem),
    (0, MISSING, "no CUDA GPU is visible to CTranslate2 (get_cuda_device_count() is 0"),
])
def test_device_cuda_that_cannot_run_is_a_config_error(start_server, tiny_dir, monkeypatch, count, cublas, reason):
    gpus(monkeypatch, count, cublas)
    with pytest.raises(runnel.ConfigError) as caught:
        start_server(tiny_config(tiny_dir, device="cuda"))
    assert caught.value.key == "apps.tiny.device"
    assert caught.value.message.startswith(f'"cuda" cannot run here: {reason}')


@pytest.mark.skipif(ctranslate2.get_cuda_device_count() > 0, reason="this machine has a GPU")
def test_runnel_refuses_device_cuda_on_a_machine_without_a_gpu(tmp_path, tiny_dir):
    config = tmp_path / "gpu.toml"
    config.write_text(f'[apps.tiny]\nbackend = "ctranslate2"\nmodel = "{tiny_dir}"\ndevice = "cuda"\n')
    result = subprocess.run([sys.executable, "-m", "runnel", "serve", "--config", str(config), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # a config error, before anything listens
    assert result.stderr.startswith(f'runnel: config error: {config}: apps.tiny.device: "cuda" cannot run here: '
                                    "no CUDA GPU is visible to CTranslate2"), result.stderr


def test_batching_defaults_follow_the_device(start_server, tiny_dir):
    options = tiny_config(tiny_dir)
    for key in ("max_batch_size", "batch_window_ms"):
        options["apps"]["tiny"].pop(key, None)
    app = start_server(options).server.apps.get("tiny")
    assert (app.max_batch_size, app.batch_window) == cuda.BATCH_DEFAULTS["cpu"] == (16, 0.002)
    app = start_server(tiny_config(tiny_dir, max_batch_size=3, batch_window_ms=0)).server.apps.get("tiny")
    assert (app.max_batch_size, app.batch_window) == (3, 0.0)
