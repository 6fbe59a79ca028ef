"""Protocol methods about the worker itself: hello, capability_probe, apply_patch, shutdown."""

from __future__ import annotations

from fleet.errors import NoWorkloadError
from fleet.protocol import (
    CAPABILITIES,
    PROTOCOL_VERSION,
    CapabilityEstimate,
    CapabilityProbeResult,
    Empty,
    HelloResult,
    PatchOutcomeResult,
    Rejected,
    RuntimePatch,
    ShutdownResult,
    WorkloadRef,
    validate,
)
from fleet.runtime import WorkerRuntime
from fleet.tasks.base import protocol_task


@protocol_task("hello")
def hello(rt: WorkerRuntime, req: Empty, ref: WorkloadRef | None) -> HelloResult:
    """``{protocol_version: 2, workload_name, capabilities}``; ``workload_name`` is ""
    on a worker with no default workload when the call names none."""
    try:
        name = rt.workload(ref).name
    except NoWorkloadError:
        name = ""
    return HelloResult(
        protocol_version=PROTOCOL_VERSION,
        workload_name=name,
        capabilities=list(CAPABILITIES),
        worker=rt.identity.name,
    )


@protocol_task("capability_probe")
def capability_probe(
    rt: WorkerRuntime, req: Empty, ref: WorkloadRef | None
) -> CapabilityProbeResult:
    """Runs the workload's ``runtime_device()`` and ``capability_probe()`` hooks and
    records the estimate on this worker's registry entry."""
    workload = rt.workload(ref)
    device = str(workload.call("runtime_device"))
    capability = validate("capability_probe", CapabilityEstimate, workload.call("capability_probe"))
    rt.registry.update_worker(rt.identity.name, capability=capability.model_dump())
    return CapabilityProbeResult(runtime_device=device, capability=capability)


@protocol_task("apply_patch")
def apply_patch(
    rt: WorkerRuntime, req: RuntimePatch, ref: WorkloadRef | None
) -> PatchOutcomeResult:
    """Apply a RuntimePatch to this worker's workload. A workload without the hook
    gives ``{"Rejected": ...}`` (docs/protocol.md section 1).

    Raises:
        RequestValidationError: the hook returned something that is not a PatchOutcome.
    """
    workload = rt.workload(ref)
    if not workload.has("apply_patch"):
        return PatchOutcomeResult(
            Rejected(Rejected=f"workload {workload.name} has no apply_patch hook")
        )
    outcome = workload.call("apply_patch", req.model_dump(by_alias=True))
    return validate("apply_patch", PatchOutcomeResult, outcome)


@protocol_task("shutdown")
def shutdown(rt: WorkerRuntime, req: Empty, ref: WorkloadRef | None) -> ShutdownResult:
    """Release every handle of this worker, deregister it, and ask Celery for a warm
    shutdown of this worker only (the current task finishes first)."""
    from celery import current_app

    rt.stop()
    current_app.control.shutdown(destination=[rt.identity.name])
    return ShutdownResult(ok=True)
