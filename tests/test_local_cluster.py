"""`fleet demo` end to end (short mode) and `fleet up` leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.registry import Registry
from fleet.settings import FleetSettings
from tests.harness import wait_until


def _clean_env() -> dict[str, str]:
    """No FLEET_* settings: the commands start their own embedded Redis."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(1800)
def test_fleet_demo_short_mode_writes_the_report(tmp_path, artifacts_dir):
    root = tmp_path / ".fleet"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet",
            "demo",
            "--rounds",
            "2",
            "--inner-steps",
            "5",
            "--no-flower",
            "--root",
            str(root),
        ],
        env=_clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "DiLoCo eval loss" in out.stdout and "report:" in out.stdout
    [report_dir] = list((root / "shared" / "reports").iterdir())
    report = json.loads((report_dir / "report.json").read_text())
    png = (report_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (artifacts_dir / "demo-report.png").write_bytes(png)
    diloco, baseline = report["diloco"], report["baseline"]
    assert diloco["config"]["workload"] == "fleet.examples.charlm:make"
    assert diloco["config"]["replicas"] == 2 and diloco["config"]["inner_steps"] == 5
    # both runs trained on leases of the charlm microshard dataset
    assert diloco["config"]["dataset"]["path"] == "datasets/charlm-stdlib-256"
    assert all(r["lease"]["shards"] for m in diloco["rounds"] for r in m["replicas"])
    assert all(r["lease"]["shards"] for m in baseline["rounds"] for r in m["replicas"])
    assert [m["round"] for m in diloco["rounds"]] == [0, 1]
    for m in diloco["rounds"]:
        assert m["wall_s"] > 0 and m["outer_step_s"] > 0
        assert sorted(r["replica"] for r in m["replicas"] if r["status"] == "merged") == [0, 1]
        assert all(r["compute_s"] > 0 and r["metrics"]["tokens"] > 0 for r in m["replicas"])
    # evaluated every DEMO_EVAL_EVERY (2) rounds and after the last
    assert [m["eval"] is not None for m in diloco["rounds"]] == [False, True]
    losses = [diloco["initial_eval"]["metrics"]["loss"]] + [
        m["eval"]["metrics"]["loss"] for m in diloco["rounds"] if m["eval"]
    ]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 1.0, losses
    assert baseline["config"]["replicas"] == 1 and len(baseline["rounds"]) >= 1
    last = baseline["rounds"][-1]["eval"]["metrics"]["loss"]
    assert last < baseline["initial_eval"]["metrics"]["loss"]
    comparison = report["comparison"]
    assert comparison["at_wall_s"] > 0
    assert {"diloco_eval_loss", "baseline_eval_loss", "diloco_better"} <= set(comparison)
    # each loss with its standard error over the held-out windows, in the summary too
    for run in ("diloco", "baseline"):
        stderr = comparison[f"{run}_eval_loss_stderr"]
        assert 0 < stderr < 0.05 * comparison[f"{run}_eval_loss"], comparison
    assert f"± {comparison['diloco_eval_loss_stderr']:.4f}" in out.stdout
    # the time-to-loss table: both runs reach every target, in wall-clock s and tokens
    rows = comparison["time_to_loss"]
    assert rows and [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    step_tokens = 16 * 128  # charlm's batch x context, per replica per inner step
    for r in rows:
        assert r["diloco_s"] > 0 and r["baseline_s"] > 0, rows
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["diloco_s"])
        assert r["diloco_tokens"] % (2 * 5 * step_tokens) == 0, rows  # whole rounds, both
        assert r["baseline_tokens"] % (5 * step_tokens) == 0, rows
    assert "time to eval loss" in out.stdout and f"{rows[-1]['loss']:.4f}" in out.stdout
    assert not (root / "cluster.json").exists(), "the cluster was stopped"


def _start_up(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``fleet up`` in the background, its output (stdout and stderr) in a pipe."""
    return subprocess.Popen(
        args, env=_clean_env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_fleet_up_leaves_no_process_behind(tmp_path, how):
    root = tmp_path / ".fleet"
    args = [sys.executable, "-m", "fleet", "up", "--workers", "2", "--root", str(root)]
    if how == "sigkill":
        args.append("--no-flower")
    else:
        args += ["--flower-port", "0"]
    proc = _start_up(args, tmp_path)
    try:
        wait_until(lambda: (root / "cluster.json").exists(), 120)
        state = json.loads((root / "cluster.json").read_text())
        pids = list(state["pids"].values())
        assert len(pids) == (3 if how == "sigkill" else 4)  # 2 workers, redis (, flower)
        assert all(_alive(p) for p in pids)
        registry = Registry.from_settings(FleetSettings(redis_url=state["redis_url"]))
        assert sorted(w.name for w in registry.workers()) == sorted(
            w["name"] for w in state["workers"]
        )
        registry.redis.close()
        # the workers' pool children too
        children = [
            int(c) for p in pids for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()
        ]
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, output
            assert "stopped: no process left running" in output
        else:
            proc.kill()
            proc.wait(10)
        wait_until(lambda: not any(_alive(p) for p in pids + children), 60)
    finally:
        if proc.poll() is None:
            proc.kill()


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
        out += children
        todo += children
    return out


def test_fleet_up_interrupted_during_start_up_stops_everything(tmp_path):
    """Ctrl-C while the workers are still coming up is a normal stop: exit 0, nothing left."""
    root = tmp_path / ".fleet"
    args = [sys.executable, "-m", "fleet", "up", "--workers", "2", "--no-flower"]
    proc = _start_up([*args, "--root", str(root)], tmp_path)
    try:
        wait_until(lambda: (root / "logs" / "worker-1.log").exists(), 120)
        started = _descendants(proc.pid)
        assert started, "redis-server and the workers were started"
        assert not (root / "cluster.json").exists(), "interrupted before the cluster was up"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert "Aborted" not in output and "Traceback" not in output, output
        assert "stopped: no process left running" in output
        wait_until(lambda: not any(_alive(p) for p in started), 60)
    finally:
        if proc.poll() is None:
            proc.kill()
