"""Idle polling back-off: grows to its cap, resets when busy; GPU nodes use a short cap."""

import time

from disagg_mpi.runtime.comms import GPU_IDLE_CAP, Backoff


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(start=1e-5, cap=4e-5)
    delays = []
    for _ in range(5):
        delays.append(b.delay)
        b.idle()
    assert delays == [1e-5, 2e-5, 4e-5, 4e-5, 4e-5]
    b.busy()
    assert b.delay == 1e-5


def test_gpu_nodes_poll_with_a_short_cap():
    gpu, cpu = Backoff.for_devices(True), Backoff.for_devices(False)
    assert gpu.cap == GPU_IDLE_CAP <= 2e-4 < cpu.cap == 2e-3
    for _ in range(20):
        gpu.idle()
    t0 = time.perf_counter()
    gpu.idle()
    assert gpu.delay == GPU_IDLE_CAP and time.perf_counter() - t0 < 0.05
