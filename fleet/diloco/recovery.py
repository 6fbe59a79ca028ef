"""Recovery from a committed outer step that no worker can replay: one of its
pseudo-gradients went bad on the shared root after the step was computed (the worker
that computed it read its own replica's from its disk). A worker that holds the global
model publishes it in full as a checkpoint, and the others catch up from there
(docs/protocol.md section 5.7)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fleet.diloco.context import RunContext
from fleet.diloco.layout import names_pack
from fleet.diloco.state import DriverState
from fleet.errors import CodecError, StorageError
from fleet.protocol import PublishGlobalResult


def republish_after_corrupt_step(
    ctx: RunContext, state: DriverState, error: Exception, workers: Sequence[str]
) -> DriverState | None:
    """If ``error`` names a pseudo-gradient of a committed outer step (corrupt or missing
    on the shared root after the step was computed: the worker that computed it read its
    own replica's from its disk), no worker can replay that step: have one of
    ``workers`` that holds the global model entering ``state.next_round`` publish it in
    full as that round's checkpoint, and return ``state`` with it, so that workers catch
    up from it. None: the error names no committed pack, or no worker could publish.
    """
    path = str(getattr(error, "path", "") or "")
    committed = [w.pack.path for s in state.steps for w in s.replicas]
    if not path or not any(names_pack(path, p) for p in committed):
        return None
    spec = state.global_model()
    target = ctx.layout.checkpoint(state.next_round)
    fields = {"run": ctx.store.job_id, "global_model": spec.model_dump(mode="json"), "path": target}
    for worker in workers:
        call = ctx.fleet.prepare(
            "publish_global", fields, PublishGlobalResult.model_validate, worker=worker
        )
        try:
            result = ctx.fleet.run(call, True, None)
        except (CodecError, StorageError) as exc:
            ctx.log("%s cannot publish round %d's model: %s", worker, spec.round, exc)
            continue
        ctx.log(
            "a committed pseudo-gradient is unreadable (%s); round %d's model published in "
            "full from %s for the workers to catch up from",
            path,
            spec.round,
            worker,
            level=logging.WARNING,
        )
        checkpoints = [c for c in state.checkpoints if c.round != state.next_round]
        return state.model_copy(update={"checkpoints": [*checkpoints, result.checkpoint]})
    return None
