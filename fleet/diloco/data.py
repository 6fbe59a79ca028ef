"""The data side of a DiLoCo run with a dataset: the index (read on a worker when the
run starts, so a missing or mis-sized shard stops it before anything trains), each
round's leases (sized by the measured speed of the replicas' workers, fleet.data.leases),
the BatchRefs of a lease, and the content hashes its worker checks."""

from __future__ import annotations

import math
from typing import Any

from fleet.client import Fleet
from fleet.data.dataset import DatasetIndex
from fleet.data.leases import DataCursor, Lease, lease_sizes, plan_leases
from fleet.diloco.config import DatasetConfig, DiLoCoConfig
from fleet.diloco.state import DriverState, RoundPlan
from fleet.errors import DatasetFormatError, FleetError


class RunData:
    """A run's dataset, its leases and BatchRefs.

    Raises:
        DatasetError: (when built) the dataset cannot be read as it is.
    """

    def __init__(self, fleet: Fleet, config: DiLoCoConfig, job_id: str) -> None:
        assert config.dataset is not None
        self.fleet = fleet
        self.config = config
        self.dataset: DatasetConfig = config.dataset
        self.job_id = job_id
        fields = {"path": self.dataset.path, "glob": self.dataset.glob}
        call = fleet.prepare("dataset_index", fields, DatasetIndex.model_validate)
        self.index: DatasetIndex = fleet.run(call, True, config.replica_call_timeout_s)
        self.ids = [m.microshard_id for m in self.index.microshards]

    def check(self, state: DriverState) -> None:
        """Refuse to resume on a dataset other than the one the run started with.

        Raises:
            DatasetFormatError: the view id changed.
        """
        if state.dataset_view is not None and state.dataset_view != self.index.view_id:
            raise DatasetFormatError(
                self.index.path,
                f"view {self.index.view_id} differs from {state.dataset_view}, the one this run "
                "started with",
            )

    def initial(self) -> dict[str, Any]:
        """The fields of a new run's state for its data."""
        return {"data": DataCursor(seed=self.dataset.seed), "dataset_view": self.index.view_id}

    def speeds(self, workers: list[str]) -> list[float | None]:
        """Each worker's measured ``work_units_per_second`` (probed now with the run's
        workload where none was recorded)."""
        infos = {w.name: w for w in self.fleet.workers()}
        missing = [w for w in set(workers) if not (infos.get(w) and infos[w].capability)]
        probes = {
            w: self.fleet.capability_probe(
                worker=w, workload=self.config.workload, config=self.config.config, wait=False
            )
            for w in missing
        }
        measured = {}
        for w, probe in probes.items():
            try:
                measured[w] = probe.result(self.config.replica_call_timeout_s).capability
            except FleetError:
                continue
        out: list[float | None] = []
        for w in workers:
            info = infos.get(w)
            recorded = info.capability if info and info.capability else None
            if recorded is not None:
                out.append(float(recorded["work_units_per_second"]))
            elif w in measured:
                out.append(measured[w].work_units_per_second)
            else:
                out.append(None)
        return out

    def plan(self, state: DriverState, placement: list[str]) -> RoundPlan:
        """The round's leases (one per replica, disjoint) and the cursor after them."""
        cfg = self.config
        per_round = self.dataset.microshards_per_round or math.ceil(len(self.ids) / cfg.rounds)
        sizes = lease_sizes(
            cfg.replicas,
            per_lease=self.dataset.microshards_per_lease,
            per_round=per_round,
            speeds=self.speeds(placement) if self.dataset.microshards_per_lease is None else [],
        )
        cursor = state.data or DataCursor(seed=self.dataset.seed)
        leases, after = plan_leases(cursor, self.ids, sizes)
        return RoundPlan(round=state.next_round, started_at=0.0, leases=leases, cursor_after=after)

    def batches(self, round_index: int, replica: int, lease: Lease | None) -> list[dict[str, Any]]:
        """The BatchRefs of a lease: ``microshards_per_batch`` shards each, paths relative
        to the shared root (each worker resolves them under its own mount)."""
        assert lease is not None
        per = self.dataset.microshards_per_batch
        shards = [self.index.microshards[s.index] for s in lease.shards]
        out = []
        for step, start in enumerate(range(0, len(shards), per)):
            group = shards[start : start + per]
            common = {
                "microshard_ids": [m.microshard_id for m in group],
                "ordinals": [m.ordinal for m in group],
                "bytes_len": sum(m.bytes_len for m in group),
            }
            paths = [m.path for m in group]
            if self.dataset.batch_kind == "cached_microshard_group":
                out.append({"kind": "cached_microshard_group", "shard_paths": paths, **common})
                continue
            out.append(
                {
                    "kind": "micro_epoch",
                    "lease_id": f"{self.job_id}/r{round_index}/i{replica}",
                    "pipeline_kind": "fleet-microshards",
                    "payload": {
                        "dataset_root": self.index.path,
                        "shard_paths": paths,
                        "microshards_per_batch": per,
                        "replica": replica,
                        "num_replicas": self.config.replicas,
                        "round": round_index,
                        "step": step,
                    },
                    **common,
                }
            )
        return out

    def shard_checks(self, lease: Lease | None) -> dict[str, Any] | None:
        """The content hashes the worker checks before training on a lease (None when the
        dataset records none)."""
        if lease is None:
            return None
        shards = [self.index.microshards[s.index] for s in lease.shards]
        expected = [
            {"path": m.path, "microshard_id": m.microshard_id, "content_hash": m.content_hash}
            for m in shards
            if m.content_hash is not None
        ]
        return {"dataset": self.index.path, "shards": expected} if expected else None
