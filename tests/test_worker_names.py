"""Worker names are unique: a free CPU slot is claimed atomically, and a GPU or slot held
by a live worker makes a second process exit at once, naming the first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from fleet.client import Fleet
from fleet.local import worker_env
from tests.harness import DIGITS, REPO, wait_until


def _start(settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleet", "worker", *args, "--workload", DIGITS],
        env=worker_env(settings, [str(REPO)]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _wait_alive(fleet: Fleet, names: set[str], timeout_s: float = 60) -> None:
    wait_until(lambda: names <= {w.name for w in fleet.workers()}, timeout_s, f"{names} up")


def test_cpu_workers_without_a_slot_take_distinct_free_slots(fleet_settings, fleet, two_workers):
    taken = {w.name for w in fleet.workers()}
    procs = [_start(fleet_settings, "--cpu"), _start(fleet_settings, "--cpu")]  # same second
    try:
        wait_until(lambda: len({w.name for w in fleet.workers()} - taken) >= 2, 60, "2 workers")
        new = sorted({w.name for w in fleet.workers()} - taken)
        assert len(set(new)) == 2 and all(n.startswith("fleet-cpu") for n in new)
        slots = sorted(int(n.split("@")[0].removeprefix("fleet-cpu")) for n in new)
        free = [s for s in range(64) if f"fleet-cpu{s}@testnode" not in taken][:2]
        assert slots == free, "the lowest free slots, one each"
        for name in new:  # each serves its own queue
            assert fleet.hello(worker=name, timeout_s=30).worker == name
        # the models of the first workers are untouched by the newcomers
        assert all(h.status == "live" for h in fleet.registry.handles(owner=two_workers[0].name))
    finally:
        for proc in procs:
            _stop(proc)


def test_a_held_slot_makes_the_second_worker_exit_at_once(fleet_settings, fleet, two_workers):
    first = two_workers[0]
    handle = fleet.init_model("cpu", worker=first.name)
    second = _start(fleet_settings, "--cpu", "--slot", str(first.slot))
    output, _ = second.communicate(timeout=60)  # a second worker that served would not exit
    assert second.returncode == 1, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert first.name in lines[0] and f"pid {first.proc.pid}" in lines[0]
    assert socket.gethostname() in lines[0] and "WorkerSlotTakenError" in lines[0]
    # the first worker and its model are unaffected
    assert fleet.hello(worker=first.name).worker == first.name
    assert fleet.handle_record(handle).status == "live"
    fleet.release_model(handle)


def test_a_held_gpu_makes_the_second_worker_exit_at_once(fleet_settings, fleet):
    first = _start(fleet_settings, "--gpu", "4")
    try:
        _wait_alive(fleet, {"fleet-gpu4@testnode"})
        second = _start(fleet_settings, "--gpu", "4")
        output, _ = second.communicate(timeout=60)
        assert second.returncode == 1 and output.strip().count("\n") == 0, output
        assert "fleet-gpu4@testnode" in output and f"pid {first.pid}" in output
        assert fleet.hello(worker="fleet-gpu4@testnode").worker == "fleet-gpu4@testnode"
    finally:
        _stop(first)
    # stopped cleanly: the claim is released and the name can be used again at once
    again = _start(fleet_settings, "--gpu", "4")
    try:
        _wait_alive(fleet, {"fleet-gpu4@testnode"})
    finally:
        _stop(again)
