"""Protocol methods that create, move and drop models: init_model, release_model,
import/export_parameter_pack, parameter_pack_plan, load/materialize_model_artifact."""

from __future__ import annotations

from fleet.codec import pack_plan
from fleet.codec.convert import load_state_artifact, save_state_artifact
from fleet.codec.manifest import read_manifest
from fleet.devices import resolve_device
from fleet.files import atomic_write_bytes, publishing
from fleet.model_packs import load_pack_into_held, publish_state_pack, state_from_pack
from fleet.protocol import (
    EmptyResult,
    ExportParameterPackRequest,
    ExportResult,
    ImportParameterPackRequest,
    InitModelRequest,
    LoadModelArtifactRequest,
    LoadParameterPackRequest,
    MaterializeModelArtifactRequest,
    ModelIdResult,
    ParameterPackPlanRequest,
    ParameterPackPlanResult,
    ReleaseModelRequest,
    WorkloadRef,
)
from fleet.runtime import WorkerRuntime
from fleet.storage import PackRef
from fleet.tasks.base import protocol_task

CUSTOM_PACK_HOOKS = ("export_parameter_pack_path", "import_parameter_pack_path")


@protocol_task("load_parameter_pack")
def load_parameter_pack(
    rt: WorkerRuntime, req: LoadParameterPackRequest, ref: WorkloadRef | None
) -> EmptyResult:
    """fleet extension: load a pack into a held model in place (its optimizer and other
    state stay); the pack becomes the handle's last pack."""
    held = rt.held(req.model_id, tracks_loaded=True)  # load_pack_into_held keeps track
    rel = rt.shared.relative(req.parameter_pack_path)
    path = rt.shared.local_pack(rel, req.pack)
    load_pack_into_held(held, path, req.state_dict_filter, req.pack)
    rt.registry.touch(req.model_id, bump_generation=True)
    rt.registry.publish_pack(req.model_id, PackRef.of(rel, read_manifest(path)))
    return EmptyResult()


@protocol_task("init_model")
def init_model(rt: WorkerRuntime, req: InitModelRequest, ref: WorkloadRef | None) -> ModelIdResult:
    """Build a model with the workload's ``init_model(device)`` and hold it under a new
    global model id."""
    workload = rt.workload(ref)
    device = resolve_device(req.device)
    state = workload.call("init_model", device)
    return ModelIdResult(model_id=rt.add_model(state, workload, device))


@protocol_task("release_model")
def release_model(
    rt: WorkerRuntime, req: ReleaseModelRequest, ref: WorkloadRef | None
) -> EmptyResult:
    """Drop a held model and its registry record. Raises HandleNotFound if not held here."""
    rt.release(req.model_id)
    return EmptyResult()


@protocol_task("export_parameter_pack")
def export_parameter_pack(
    rt: WorkerRuntime, req: ExportParameterPackRequest, ref: WorkloadRef | None
) -> ExportResult:
    """Publish a held model as a pack at ``parameter_pack_path`` (shared-root relative)
    and record it as the handle's last pack. The result carries the PackRef."""
    held = rt.held(req.model_id, tracks_loaded=True)
    rel = rt.shared.relative(req.parameter_pack_path)
    with rt.shared.output(rel) as dest:
        publish_state_pack(
            held.workload, held.state, dest, req.model_schema_hash, req.state_dict_filter
        )
        pack = PackRef.of(rel, read_manifest(dest))
    rt.registry.publish_pack(req.model_id, pack)
    return ExportResult(pack=pack)


@protocol_task("import_parameter_pack")
def import_parameter_pack(
    rt: WorkerRuntime, req: ImportParameterPackRequest, ref: WorkloadRef | None
) -> ModelIdResult:
    """Hold a new model on ``device`` loaded from the pack at ``parameter_pack_path``."""
    workload = rt.workload(ref)
    rel = rt.shared.relative(req.parameter_pack_path)
    path = rt.shared.local_pack(rel, req.pack)
    device = resolve_device(req.device)
    state = state_from_pack(workload, device, path, req.state_dict_filter, req.pack)
    model_id = rt.add_model(state, workload, device)
    rt.registry.publish_pack(model_id, PackRef.of(rel, read_manifest(path)))
    return ModelIdResult(model_id=model_id)


@protocol_task("parameter_pack_plan")
def parameter_pack_plan(
    rt: WorkerRuntime, req: ParameterPackPlanRequest, ref: WorkloadRef | None
) -> ParameterPackPlanResult:
    """The generic codec's plan for a fresh model of the workload on ``device``. With
    custom pack hooks ``uses_custom_parameter_pack_hooks`` is true; a generic plan that
    cannot be made is reported in ``generic_plan_error``."""
    workload = rt.workload(ref)
    custom = any(workload.has(h) for h in CUSTOM_PACK_HOOKS)
    try:
        state = workload.call("init_model", resolve_device(req.device))
        plan = pack_plan(state, req.state_dict_filter)
    except Exception as exc:
        if not custom:
            raise
        return ParameterPackPlanResult(
            uses_custom_parameter_pack_hooks=True, generic_plan_error=f"{type(exc).__name__}: {exc}"
        )
    plan["uses_custom_parameter_pack_hooks"] = custom
    return ParameterPackPlanResult.model_validate(plan)


@protocol_task("load_model_artifact")
def load_model_artifact(
    rt: WorkerRuntime, req: LoadModelArtifactRequest, ref: WorkloadRef | None
) -> EmptyResult:
    """Load an artifact into a held model: ``load_model_artifact_path(state, path)`` if
    defined, else ``load_model_artifact(state, bytes)`` (a returned state replaces it),
    else fleet's default: the safetensors file of the model's state dict
    (docs/protocol.md section 5.6)."""
    held = rt.held(req.model_id)
    path = rt.shared.local_file(rt.shared.relative(req.artifact_path))
    if held.workload.has("load_model_artifact_path"):
        new_state = held.workload.call("load_model_artifact_path", held.state, str(path))
    elif held.workload.has("load_model_artifact"):
        new_state = held.workload.call("load_model_artifact", held.state, path.read_bytes())
    else:
        load_state_artifact(path, held.state)
        new_state = None
    rt.replace_state(req.model_id, held.state if new_state is None else new_state)
    return EmptyResult()


@protocol_task("materialize_model_artifact")
def materialize_model_artifact(
    rt: WorkerRuntime, req: MaterializeModelArtifactRequest, ref: WorkloadRef | None
) -> EmptyResult:
    """Write a held model as an artifact at ``artifact_path``, atomically:
    ``materialize_model_artifact_path(state, path)`` if defined (written to a temp path,
    then renamed), else the bytes of ``materialize_model_artifact(state)``, else fleet's
    default: the model's state dict as safetensors (docs/protocol.md section 5.6)."""
    held = rt.held(req.model_id)
    with rt.shared.output(rt.shared.relative(req.artifact_path)) as path:
        if held.workload.has("materialize_model_artifact_path"):
            with publishing(path) as tmp:
                held.workload.call("materialize_model_artifact_path", held.state, str(tmp))
        elif held.workload.has("materialize_model_artifact"):
            data = held.workload.call("materialize_model_artifact", held.state)
            atomic_write_bytes(path, bytes(data))
        else:
            save_state_artifact(held.state, path)
    rt.registry.touch(req.model_id)
    return EmptyResult()
