"""The BatchRefs a replica's inner loop gets (docs/protocol.md section 3).

Without a dataset, replica ``i`` of ``N`` gets one ``micro_epoch`` BatchRef per inner
step ``s`` of round ``r``: ``{"kind": "micro_epoch", "microshard_ids": ["shard-i"],
"ordinals": [r * H + s], "payload": {"replica": i, "num_replicas": N, "round": r,
"step": s}, ...}``, and shards its own data by ``payload.replica``.
"""

from __future__ import annotations

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
