"""The client's merge methods: merge_candidate_models, apply_single_root_ema,
reconcile_canonical_model. They run on the owner of the model they produce or update;
a model held by another worker joins as a parameter pack that its owner exports to
``tmp/exchange/`` first (docs/design.md decision 4; ``fleet gc`` removes those packs once
no handle refers to them)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from fleet.calls import Dispatcher, HandleLike, ModelHandle, model_id_of, pack_ref_result
from fleet.registry import HandleRecord
from fleet.storage import PackRef


class MergeCalls(Dispatcher):
    """The merge methods of :class:`~fleet.client.Fleet`."""

    def _pack_for(self, record: HandleRecord) -> PackRef:
        """Have the owner of ``record`` export it to a scratch pack on the shared root
        (``tmp/exchange/``; ``fleet gc`` removes those nothing refers to any more)."""
        path = f"tmp/exchange/{uuid.uuid4().hex}/{record.model_id}"
        fields = {"parameter_pack_path": path, "model_schema_hash": "fleet-exchange"}
        call = self.prepare("export_parameter_pack", fields, pack_ref_result, handle=record)
        return self.run(call, True, None)

    def _candidate(self, item: Any, base: HandleRecord, index: int) -> dict[str, Any]:
        if isinstance(item, dict):
            return dict(item)
        if isinstance(item, PackRef):
            path, pack = item.path, item.model_dump()
            return {"peer_id": f"pack-{index}", "head_id": path, "artifact_id": path, "pack": pack}
        record = self.registry.live_handle(model_id_of(item))
        candidate: dict[str, Any] = {
            "peer_id": record.owner,
            "head_id": record.model_id,
            "artifact_id": record.model_id,
        }
        if record.owner == base.owner:
            candidate["model_id"] = record.model_id
        else:
            candidate["pack"] = self._pack_for(record).model_dump()
        return candidate

    def merge_candidate_models(
        self,
        base: HandleLike,
        candidates: Sequence[HandleLike | PackRef | dict[str, Any]],
        policy: Any = "WeightedMean",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle | None:
        """Merge candidates into a new model on the base's owner.

        Candidates are handles (on the base's worker: passed by id; elsewhere: their
        owners export packs first), PackRefs, or full candidate records
        ``{peer_id, head_id, artifact_id, model_id | pack, sample_weight, quality_weight}``.
        """
        record = self.registry.live_handle(model_id_of(base))
        fields = {
            "candidates": [self._candidate(c, record, i) for i, c in enumerate(candidates)],
            "policy": policy,
        }
        call = self.prepare("merge_candidate_models", fields, self.maybe_handle_of, handle=record)
        return self.run(call, True, timeout_s)

    def _update_in_place(
        self, method: str, other: HandleLike, target: HandleLike, **fields: Any
    ) -> ModelHandle:
        """Call ``method`` on ``target``'s owner to update it from ``other``, which goes by
        id when both are on one worker, else as a pack its owner exports first.
        ``fields``: ``other_field`` and ``pack_field`` (the request's names for the other
        model's id and pack), the request's other fields, and ``timeout_s``."""
        timeout_s = fields.pop("timeout_s")
        target_record = self.registry.live_handle(model_id_of(target))
        other_record = self.registry.live_handle(model_id_of(other))
        other_field, pack_field = fields.pop("other_field"), fields.pop("pack_field")
        params = {other_field: other_record.model_id, **fields}
        if other_record.owner != target_record.owner:
            params[pack_field] = self._pack_for(other_record).model_dump()
        call = self.prepare(method, params, self.handle_of, handle=target_record)
        return self.run(call, True, timeout_s)

    def apply_single_root_ema(
        self,
        base: HandleLike,
        merged: HandleLike,
        policy: Any = "Ema",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """EMA of ``merged`` towards ``base``, in place on ``merged``'s owner."""
        return self._update_in_place(
            "apply_single_root_ema",
            base,
            merged,
            other_field="base_model_id",
            pack_field="base_pack",
            policy=policy,
            timeout_s=timeout_s,
        )

    def reconcile_canonical_model(
        self,
        local: HandleLike,
        canonical: HandleLike,
        strategy: Any = "Replace",
        *,
        timeout_s: float | None = None,
    ) -> ModelHandle:
        """Reconcile ``local`` into ``canonical``, in place on ``canonical``'s owner."""
        return self._update_in_place(
            "reconcile_canonical_model",
            local,
            canonical,
            other_field="local_model_id",
            pack_field="local_pack",
            strategy=strategy,
            timeout_s=timeout_s,
        )
