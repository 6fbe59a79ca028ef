"""Protocol methods that combine models: merge_candidate_models, apply_single_root_ema,
reconcile_canonical_model. Models held by other workers arrive as PackRefs and are
imported into temporary states for the call (docs/design.md decision 4)."""

from __future__ import annotations

from typing import Any

from fleet.errors import RequestValidationError
from fleet.model_packs import state_from_pack
from fleet.protocol import (
    ApplySingleRootEmaRequest,
    MergeCandidateModelsRequest,
    ModelIdResult,
    OptionalModelIdResult,
    ReconcileCanonicalModelRequest,
    WorkloadRef,
)
from fleet.runtime import HeldModel, WorkerRuntime
from fleet.storage import PackRef
from fleet.tasks.base import protocol_task


def _as_json(value: Any) -> Any:
    return value if isinstance(value, str) else value.model_dump(mode="json")


def model_state(
    rt: WorkerRuntime, base: HeldModel, method: str, model_id: str | None, pack: PackRef | None
) -> Any:
    """The state of a model given by a local handle or a PackRef (imported with the
    base model's workload onto its device).

    Raises:
        HandleNotFound: ``model_id`` is not held here and no pack was given.
        RequestValidationError: neither was given.
    """
    if model_id is not None and (pack is None or model_id in rt.models):
        return rt.held(model_id).state
    if pack is not None:
        return state_from_pack(
            base.workload, base.device, rt.shared.local_pack(pack.path, pack), None, pack
        )
    raise RequestValidationError(
        method, [{"loc": ["model_id"], "msg": "give a model_id or a pack", "type": "missing"}]
    )


@protocol_task("merge_candidate_models")
def merge_candidate_models(
    rt: WorkerRuntime, req: MergeCandidateModelsRequest, ref: WorkloadRef | None
) -> OptionalModelIdResult:
    """Merge candidates into a new model with the workload's
    ``merge_candidate_models(base, candidates, policy)`` hook. Candidates are local
    handles or PackRefs. A returned state is held under a new model id; None gives
    ``{"model_id": null}``."""
    base = rt.held(req.base_model_id)
    candidates = [
        {
            "peer_id": c.peer_id,
            "head_id": c.head_id,
            "artifact_id": c.artifact_id,
            "model": model_state(rt, base, "merge_candidate_models", c.model_id, c.pack),
            "sample_weight": c.sample_weight,
            "quality_weight": c.quality_weight,
        }
        for c in req.candidates
    ]
    merged = base.workload.call(
        "merge_candidate_models", base.state, candidates, _as_json(req.policy)
    )
    if merged is None:
        return OptionalModelIdResult(model_id=None)
    return OptionalModelIdResult(model_id=rt.add_model(merged, base.workload, base.device))


@protocol_task("apply_single_root_ema")
def apply_single_root_ema(
    rt: WorkerRuntime, req: ApplySingleRootEmaRequest, ref: WorkloadRef | None
) -> ModelIdResult:
    """``apply_single_root_ema(base, merged, policy)``; the result (or, if None, the
    merged model unchanged) stays under ``merged_model_id``."""
    merged = rt.held(req.merged_model_id)
    base_state = model_state(rt, merged, "apply_single_root_ema", req.base_model_id, req.base_pack)
    result = merged.workload.call(
        "apply_single_root_ema", base_state, merged.state, _as_json(req.policy)
    )
    rt.replace_state(req.merged_model_id, merged.state if result is None else result)
    return ModelIdResult(model_id=req.merged_model_id)


@protocol_task("reconcile_canonical_model")
def reconcile_canonical_model(
    rt: WorkerRuntime, req: ReconcileCanonicalModelRequest, ref: WorkloadRef | None
) -> ModelIdResult:
    """``reconcile_canonical_model(local, canonical, strategy)``; the result (or, if
    None, the canonical model unchanged) stays under ``canonical_model_id``."""
    canonical = rt.held(req.canonical_model_id)
    local_state = model_state(
        rt, canonical, "reconcile_canonical_model", req.local_model_id, req.local_pack
    )
    result = canonical.workload.call(
        "reconcile_canonical_model", local_state, canonical.state, _as_json(req.strategy)
    )
    rt.replace_state(req.canonical_model_id, canonical.state if result is None else result)
    return ModelIdResult(model_id=req.canonical_model_id)
