"""DeviceSettings.resolve: threads within the cores (a worker's share of them), a GPU per worker."""

from __future__ import annotations

import ctranslate2
import pytest
from runnel_ctranslate2.apps import DeviceSettings

from runnel.supervisor import WorkerSlot, worker_slot


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
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 2)
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
