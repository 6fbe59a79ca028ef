"""Every path of a DiLoCo run on the shared root, deterministic per (job, round, replica,
attempt), so a re-run or a redelivered task writes where the first one did and never
over another attempt's output.

::

    runs/<job>/round-RRRR/replica-I-aA              replica I's pseudo-gradient of round R,
                                                    attempt A
    runs/<job>/round-RRRR/replica-I-aA.result.json  that attempt's result (exactly once)
    runs/<job>/checkpoint-RRRR/global               the global model entering round R, in
                                                    full (R = 0: the initial model)
    runs/<job>/checkpoint-RRRR/global-<buffer>      the outer optimizer's buffer then
                                                    (``momentum`` for Nesterov and SGD)
    runs/<job>/replica-I/state-RRRR-aA/             replica I's state after round R,
                                                    attempt A: ``optimizer`` (the inner
                                                    optimizer state file, if its loop keeps
                                                    one) and ``residual/`` (error feedback)

Attempt numbers are unique per (round, replica) across orchestrators: the round's plan
in Redis records every attempt launched, and a resumed run numbers on from there.
Between checkpoints the global model exists only on the workers (docs/protocol.md
section 5.7).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.storage import result_marker

if TYPE_CHECKING:
    from fleet.protocol import ReplicaCheckpoint

__all__ = ["RunLayout", "result_marker"]


@dataclass(frozen=True)
class RunLayout:
    """The paths of job ``job_id``'s run (all relative to the shared root)."""

    job_id: str

    @property
    def run_dir(self) -> str:
        return f"runs/{self.job_id}"

    def round_dir(self, round_index: int) -> str:
        return f"{self.run_dir}/round-{round_index:04d}"

    def replica_pack(self, round_index: int, replica: int, attempt: int) -> str:
        """Replica ``replica``'s pseudo-gradient of round ``round_index``, attempt ``attempt``."""
        return f"{self.round_dir(round_index)}/replica-{replica}-a{attempt}"

    def checkpoint_dir(self, round_index: int) -> str:
        return f"{self.run_dir}/checkpoint-{round_index:04d}"

    def checkpoint(self, round_index: int) -> str:
        """The global model entering round ``round_index``, in full (its buffers are
        published beside it as ``<path>-<buffer>``)."""
        return f"{self.checkpoint_dir(round_index)}/global"

    def replica_state_dir(self, checkpoint: ReplicaCheckpoint) -> str:
        """The directory a replica state checkpoint's files are in."""
        path = checkpoint.optimizer or (checkpoint.residual.path if checkpoint.residual else "")
        return posixpath.dirname(path)

    def replica_state(self, replica: int, round_index: int, attempt: int) -> str:
        """Replica ``replica``'s state after round ``round_index``, attempt ``attempt``."""
        return f"{self.run_dir}/replica-{replica}/state-{round_index:04d}-a{attempt}"


def names_pack(error_path: str, pack_path: str) -> bool:
    """True if an error's path (as the worker saw it) is the pack ``pack_path`` or one of
    its files."""
    path = error_path.rstrip("/")
    return (
        path == pack_path
        or path.endswith("/" + pack_path)
        or path.startswith(pack_path + "/")
        or f"/{pack_path}/" in path
    )
