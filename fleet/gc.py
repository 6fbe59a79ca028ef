"""Garbage collection of the shared root (``fleet gc``).

A DiLoCo run deletes what each round supersedes as it goes; this finds what is left
over anyway: packs and optimizer states of crashed or redelivered attempts, scratch
packs in ``tmp/exchange/`` that no model handle refers to any more, and temp files a
crash left behind. For a job known to Redis it keeps what the job still needs: the
global and momentum packs of its last ``keep_rounds`` rounds, its artifacts
(checkpoints, final pack), and, while it can still be resumed, the inputs of its last
committed round and the round in flight. Runs of jobs Redis does not know are left
alone (reported). Only entries older than ``min_age_s`` are touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.layout import RunLayout
from fleet.diloco.state import rounds_of, state_of
from fleet.errors import JobNotFound
from fleet.jobs import JobStore
from fleet.storage import TEMP_MARKER, SharedRoot, remove_paths


@dataclass
class Collection:
    """What a collection found: paths to delete (with their sizes in bytes), runs of
    unknown jobs left alone, and the bytes freed once deleted."""

    delete: list[tuple[Path, int]] = field(default_factory=list)
    unknown_runs: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.lstat().st_size


def _old(path: Path, min_age_s: float) -> bool:
    return time.time() - path.lstat().st_mtime >= min_age_s


def _keep_for_job(jobs: JobStore, job_id: str) -> set[str]:
    """The shared-root paths a DiLoCo job still needs."""
    job = jobs.get(job_id)
    keep = set(job.artifacts.values()) - {RunLayout(job_id).run_dir}
    state = state_of(jobs, job_id)
    if state is None:
        return keep | {RunLayout(job_id).run_dir}  # not started: leave it alone
    layout, config = RunLayout(job_id), DiLoCoConfig.model_validate(job.spec)
    for index in range(max(0, state.next_round - config.keep_rounds + 1), state.next_round + 1):
        keep |= {layout.global_pack(index), layout.momentum(index)}
    if job.status != "completed":
        keep |= {o.path for o in state.replica_opt if o is not None}
        records = rounds_of(jobs, job_id)
        if records:
            keep |= {r.pack.path for r in records[-1].merged if r.pack is not None}
        keep.add(layout.round_dir(state.next_round))  # the round in flight
    return keep


def collect(
    shared: SharedRoot,
    jobs: JobStore,
    *,
    min_age_s: float = 3600.0,
    dry_run: bool = False,
) -> Collection:
    """Find (and unless ``dry_run`` delete) what nothing needs on the shared root.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (nothing is deleted then).
    """
    out = Collection()
    root = shared.root
    runs = root / "runs"
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            keep = _keep_for_job(jobs, run_dir.name)
        except JobNotFound:
            out.unknown_runs.append(run_dir)
            continue
        for entry in sorted(run_dir.glob("*/*")):
            rel = entry.relative_to(root).as_posix()
            needed = rel in keep or entry.parent.relative_to(root).as_posix() in keep
            if not needed and _old(entry, min_age_s):
                out.delete.append((entry, _size(entry)))
    referenced = {h.last_pack.path for h in jobs.registry.handles() if h.last_pack is not None}
    exchange = root / "tmp" / "exchange"
    for entry in sorted(exchange.glob("*/*")) if exchange.is_dir() else []:
        if entry.relative_to(root).as_posix() not in referenced and _old(entry, min_age_s):
            out.delete.append((entry, _size(entry)))
    chosen = {p for p, _ in out.delete}
    for temp in sorted(root.rglob(f"*{TEMP_MARKER}*")):
        inside = temp in chosen or any(parent in chosen for parent in temp.parents)
        if temp.name.startswith(".") and not inside and _old(temp, min_age_s):
            out.delete.append((temp, _size(temp)))
    if not dry_run:
        out.freed_bytes = remove_paths(root, [p for p, _ in out.delete])
    return out
