"""The BatchRefs a replica's inner loop gets (docs/protocol.md section 3).

Without a dataset, replica ``i`` of ``N`` gets one ``micro_epoch`` BatchRef per inner
step ``s`` of round ``r``: ``{"kind": "micro_epoch", "microshard_ids": ["shard-i"],
"ordinals": [r * H + s], "payload": {"replica": i, "num_replicas": N, "round": r,
"step": s}, ...}``, and shards its own data by ``payload.replica``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.diloco.config import DiLoCoConfig


def synthetic_batches(
    job_id: str, config: DiLoCoConfig, round_index: int, replica: int
) -> list[dict[str, Any]]:
    """One ``micro_epoch`` BatchRef per inner step, for workloads that draw their own data."""
    h, n = config.inner_steps, config.replicas
    return [
        {
            "kind": "micro_epoch",
            "lease_id": f"{job_id}/r{round_index}/i{replica}",
            "microshard_ids": [f"shard-{replica}"],
            "ordinals": [round_index * h + step],
            "bytes_len": 0,
            "pipeline_kind": "fleet-diloco",
            "payload": {"replica": replica, "num_replicas": n, "round": round_index, "step": step},
        }
        for step in range(h)
    ]


def shard_paths_of(batch: dict[str, Any] | None) -> list[str]:
    """The shard files a BatchRef names (absolute on this worker): ``shard_paths`` of a
    ``cached_microshard_group``, ``payload.shard_paths`` of a ``micro_epoch``; none
    for a BatchRef that carries no data."""
    if not batch:
        return []
    if batch.get("kind") == "cached_microshard_group":
        return list(batch.get("shard_paths") or [])
    payload = batch.get("payload")
    paths = payload.get("shard_paths") if isinstance(payload, dict) else None
    return list(paths) if isinstance(paths, list) else []


def batch_key(batch: dict[str, Any]) -> str:
    """What identifies a BatchRef's data draw: its ordinals, and its lease, round and step
    when it has them (so a lease re-run in the same round draws the same samples)."""
    payload = batch.get("payload") if isinstance(batch.get("payload"), dict) else {}
    return json.dumps(
        [
            batch.get("ordinals"),
            batch.get("lease_id"),
            payload.get("round") if payload else None,
            payload.get("step") if payload else None,
        ]
    )
