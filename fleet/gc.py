"""Garbage collection of the shared root (``fleet gc``).

A DiLoCo run deletes what each round supersedes as it goes; this finds what is left
over anyway: packs and optimizer states of crashed or redelivered attempts, scratch
packs in ``tmp/exchange/`` that no model handle refers to any more, and temp files a
crash left behind. For a job known to Redis it keeps what the job still needs: its
kept full checkpoints and the pseudo-gradients since the oldest, its replicas' state
checkpoints, its artifacts (checkpoints, final pack), and, while it can still be
resumed, the round in flight. Runs of jobs Redis does not know are left
alone (reported). Only entries older than ``min_age_s`` are touched. On an object store
it also aborts unfinished multipart uploads (a worker killed while uploading); the data
objects of a pack whose manifest never came are stray entries like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fleet.diloco.layout import RunLayout
from fleet.diloco.state import state_of
from fleet.errors import JobNotFound
from fleet.jobs import JobStore
from fleet.storage import TEMP_MARKER, Store, result_marker


@dataclass
class Collection:
    """What a collection found: shared-root paths to delete (with their sizes in bytes),
    runs of unknown jobs left alone, unfinished uploads aborted, and the bytes freed."""

    delete: list[tuple[str, int]] = field(default_factory=list)
    unknown_runs: list[str] = field(default_factory=list)
    aborted_uploads: int = 0
    freed_bytes: int = 0


@dataclass
class _Group:
    size: int = 0
    mtime: float = 0.0


def _groups(store: Store, under: str, depth: int) -> dict[str, _Group]:
    """The entries ``depth`` path components deep below ``under`` (files or directory
    trees, e.g. ``runs/<job>/<round>/<pack>``), with their bytes and newest file time:
    one listing, the same on a local path and an object store (which has no folders)."""
    out: dict[str, _Group] = {}
    for entry in store.walk(under):
        parts = entry.path.split("/")
        if len(parts) < depth:
            continue
        group = out.setdefault("/".join(parts[:depth]), _Group())
        group.size += entry.size
        group.mtime = max(group.mtime, entry.mtime)
    return out


def _keep_for_job(jobs: JobStore, job_id: str) -> set[str]:
    """The shared-root paths a DiLoCo job still needs: its artifacts, its kept full
    checkpoints, the pseudo-gradients since the oldest of them, its replicas' state
    checkpoints, and (while it can be resumed) the round in flight."""
    job = jobs.get(job_id)
    layout = RunLayout(job_id)
    keep = set(job.artifacts.values()) - {layout.run_dir}
    state = state_of(jobs, job_id)
    if state is None:
        return keep | {layout.run_dir}  # not started: leave it alone
    for checkpoint in state.checkpoints:
        keep.add(checkpoint.global_pack.path)
        keep |= {p.path for p in checkpoint.state.values()}
    for step in state.steps:
        keep |= {w.pack.path for w in step.replicas}
        keep |= {result_marker(w.pack.path) for w in step.replicas}
    for start in state.replicas:
        if start.checkpoint is not None:
            keep |= {layout.replica_state_dir(start.checkpoint)}
    if job.status != "completed":
        keep.add(layout.round_dir(state.next_round))  # the round in flight
        keep |= {f"{layout.run_dir}/replica-{i}" for i in range(len(state.replicas))}
    return keep


def collect(
    store: Store,
    jobs: JobStore,
    *,
    min_age_s: float = 3600.0,
    dry_run: bool = False,
) -> Collection:
    """Find (and unless ``dry_run`` delete) what nothing needs on the shared root; on an
    object store also abort unfinished multipart uploads older than ``min_age_s``.

    Raises:
        BrokerUnavailableError: Redis cannot be reached (nothing is deleted then).
        StorageError: the store failed.
    """
    out = Collection()
    now = time.time()

    def old(group: _Group) -> bool:
        return now - group.mtime >= min_age_s

    keeps: dict[str, set[str] | None] = {}
    for rel, group in sorted(_groups(store, "runs", 4).items()):
        job_id = rel.split("/")[1]
        if job_id not in keeps:
            try:
                keeps[job_id] = _keep_for_job(jobs, job_id)
            except JobNotFound:
                keeps[job_id] = None
                out.unknown_runs.append(f"runs/{job_id}")
        keep = keeps[job_id]
        if keep is None:
            continue
        needed = rel in keep or rel.rsplit("/", 1)[0] in keep
        if not needed and old(group):
            out.delete.append((rel, group.size))
    referenced = {h.last_pack.path for h in jobs.registry.handles() if h.last_pack is not None}
    for rel, group in sorted(_groups(store, "tmp/exchange", 4).items()):
        if rel not in referenced and old(group):
            out.delete.append((rel, group.size))
    chosen = {rel for rel, _ in out.delete}
    temps: dict[str, _Group] = {}
    for entry in store.walk():
        parts = entry.path.split("/")
        for depth, part in enumerate(parts):
            if part.startswith(".") and TEMP_MARKER in part:
                temp = "/".join(parts[: depth + 1])
                group = temps.setdefault(temp, _Group())
                group.size += entry.size
                group.mtime = max(group.mtime, entry.mtime)
                break
    for rel, group in sorted(temps.items()):
        inside = any(rel == c or rel.startswith(c + "/") for c in chosen)
        if not inside and old(group):
            out.delete.append((rel, group.size))
    stale = store.stale_uploads(min_age_s)
    if not dry_run:
        out.freed_bytes = store.remove([rel for rel, _ in out.delete])
        out.aborted_uploads = store.abort_uploads(stale)
    else:
        out.aborted_uploads = len(stale)
    return out
