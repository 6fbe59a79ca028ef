"""A conformance check a user runs against their own workload, on a real fleet.

:func:`check_workload` runs a short DiLoCo job of the workload on the fleet a client
reaches (real workers: every hook a DiLoCo run calls is called as in production,
through the same tasks: ``init_model``, ``run_inner_loop`` or ``train_window``, the
parameter-pack export and import, ``evaluate``), and checks what fleet relies on:

- **it runs**: both jobs complete, every round commits, every evaluation has a finite
  ``loss``;
- **finite packs**: the final global model's pack reads back whole (its digest verified)
  with every value finite, and training moved it away from the initial model;
- **a deterministic re-run**: the same ``run_inner_loop`` request (replica 0's first
  round, from the final model), run on a freshly imported model on each of two workers,
  publishes the same pack, bit for bit. A replica attempt lost with its worker is re-run
  elsewhere from the same request, and resuming a job reproduces its rounds only if
  this holds. (Checked for workloads that draw their own data; with a ``dataset`` the
  request's batches would need the job's leases, so the re-run is not made.)

Example (with the pytest plugin, :mod:`fleet.testing.plugin`)::

    def test_my_workload(fleet_client):
        report = check_workload(fleet_client, "mylab.train:make", {"lr": 1e-3})
        assert report.final_loss < report.initial_loss
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.client import Fleet
    from fleet.diloco.config import DatasetConfig, DiLoCoConfig
    from fleet.storage.refs import PackRef


class ConformanceFailure(AssertionError):
    """The workload broke one of :func:`check_workload`'s checks; the message says which
    check, for which job and round, and what was seen. An ``AssertionError``, so pytest
    reports it as a failed check of the user's test rather than an error in it."""


@dataclass(frozen=True)
class ConformanceReport:
    """What :func:`check_workload` observed.

    Attributes:
        job_id: the DiLoCo job it ran.
        rounds: rounds committed per job.
        eval_losses: the evaluation loss after each round, in order.
        initial_loss: the evaluation loss of the initial model (before round 0), or None
            if the workload reported no ``loss`` for it.
        final_loss: the last round's evaluation loss.
        parameter_count: parameters in the model's pack (float32 values).
        final_digest: the final global model's values digest (``xxh3_64:...``).
        rerun_digests: ``(worker, values digest)`` of each re-run of replica 0's first
            round from the final model (all equal); empty with a dataset.
    """

    job_id: str
    rounds: int
    eval_losses: list[float]
    initial_loss: float | None
    final_loss: float
    parameter_count: int
    final_digest: str
    rerun_digests: list[tuple[str, str]]


def check_workload(
    client: Fleet,
    workload: str,
    config: dict[str, Any] | None = None,
    *,
    dataset: DatasetConfig | None = None,
    replicas: int = 2,
    rounds: int = 2,
    inner_steps: int = 5,
) -> ConformanceReport:
    """Run a ``rounds``-round DiLoCo job of ``workload`` and re-run one of its replica
    rounds, and check what fleet relies on (module doc).

    Args:
        client: a :class:`fleet.client.Fleet` whose workers allow ``workload``
            (``FLEET_WORKLOAD_ALLOWLIST``) and can import it.
        workload: the factory, ``"module:function"``.
        config: the factory's config (JSON-serialisable).
        dataset: a microshard dataset under the shared root to lease to the replicas;
            None for a workload that brings its own data.
        replicas, rounds, inner_steps: the job's size (defaults: a few seconds of a
            small model on CPU workers).

    Returns:
        A :class:`ConformanceReport` of the first job.

    Raises:
        ConformanceFailure: a check failed (the message names it).
        fleet.errors.FleetError: the fleet itself could not run the job (no workers,
            workload not allowlisted, ...), as :class:`fleet.diloco.DiLoCoRun` raises it.
    """
    import torch

    from fleet.codec import read_pack
    from fleet.diloco import DiLoCoConfig, DiLoCoRun

    job = DiLoCoConfig(
        workload=workload,
        config=config or {},
        replicas=replicas,
        rounds=rounds,
        inner_steps=inner_steps,
        eval_every=1,
        dataset=dataset,
    )
    job_id = f"conformance-{uuid.uuid4().hex[:10]}"
    run = DiLoCoRun.start(client, job, job_id=job_id)
    finished = run.run()
    if finished.status != "completed":
        raise ConformanceFailure(f"job {job_id} ended {finished.status}: {finished.error}")
    records = run.rounds()
    state = run.state()
    if len(records) != rounds or state is None:
        raise ConformanceFailure(f"job {job_id} committed {len(records)} of {rounds} rounds")
    losses: list[float] = []
    for record in records:
        loss = record.eval.loss if record.eval is not None else None
        if loss is None or not math.isfinite(loss):
            metrics = record.eval.metrics if record.eval is not None else None
            raise ConformanceFailure(
                f"job {job_id} round {record.round}: evaluate returned no finite "
                f"'loss' (metrics {metrics})"
            )
        losses.append(loss)
    digest, pack_path = state.global_digest, state.checkpoint.global_pack.path
    if digest == records[0].input_digest:
        raise ConformanceFailure(f"job {job_id}: training did not change the model ({digest})")
    _, values = read_pack(client.shared.local_pack(pack_path), verify=True)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ConformanceFailure(f"job {job_id}: the final pack holds {bad} non-finite values")
    reruns = (
        [] if dataset is not None else _rerun(client, job, job_id, state.checkpoint.global_pack)
    )
    if len({d for _, d in reruns}) > 1:
        raise ConformanceFailure(
            f"not a deterministic re-run: replica 0's first round from the final model "
            f"ended on {reruns} (seed every random draw of the inner loop from what it is "
            "given, not from global state, the clock, the process or the worker)"
        )
    initial = state.initial_eval.loss if state.initial_eval is not None else None
    return ConformanceReport(
        job_id=job_id,
        rounds=rounds,
        eval_losses=losses,
        initial_loss=initial,
        final_loss=losses[-1],
        parameter_count=int(values.numel()),
        final_digest=digest,
        rerun_digests=reruns,
    )


def _rerun(client: Fleet, job: DiLoCoConfig, job_id: str, pack: PackRef) -> list[tuple[str, str]]:
    """The same ``run_inner_loop`` request (replica 0's first round, from the final
    model) twice, on two workers where there are two, each time on a model freshly
    imported from the pack: ``(worker, output pack's values digest)`` per run."""
    from fleet.data.batches import synthetic_batches

    names = sorted(w.name for w in client.workers())
    workers = (names + names)[:2]
    batches = synthetic_batches(job_id, job, 0, 0)
    out: list[tuple[str, str]] = []
    for i, worker in enumerate(workers):
        handle = client.import_parameter_pack(
            pack, workload=job.workload, config=job.config, worker=worker
        )
        try:
            result = client.run_inner_loop(
                handle,
                batches,
                job.inner_steps,
                f"conformance/{job_id}/rerun-{i}",
                job.model_schema_hash,
                require_exact_steps=True,
                input_parameter_pack=pack.model_dump(mode="json"),
            )
        finally:
            client.release_model(handle)
        assert result.pack is not None
        out.append((worker, str(result.pack.values_digest)))
    return out
