"""Every path of a DiLoCo run on the shared root, deterministic per (job, round, replica,
attempt), so a re-run or a redelivered task writes where the first one did and never
over another attempt's output.

::

    runs/<job>/round-RRRR/global            the global model entering round R (R = 0: initial)
    runs/<job>/round-RRRR/<buffer>          an outer optimizer buffer after round R - 1
                                            (``momentum`` for Nesterov and SGD)
    runs/<job>/round-RRRR/prediction        an overlapped run's eager prediction of the
                                            start point of round R (by round R - 2's
                                            outer step)
    runs/<job>/round-RRRR/replica-I-aA      replica I's pack of round R, attempt A
                                            (parameters, or its pseudo-gradient)
    runs/<job>/round-RRRR/opt-I-aA.pt       the inner optimizer state that attempt wrote
    runs/<job>/round-RRRR/ef-I-aA           its error-feedback residual
    runs/<job>/round-RRRR/replica-I-aA.result.json   that attempt's result (exactly once)

Attempt numbers are unique per (round, replica) across orchestrators: the round's plan
in Redis records every attempt launched, and a resumed run numbers on from there.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.storage import result_marker

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

    def global_pack(self, round_index: int) -> str:
        """The global model entering round ``round_index``."""
        return f"{self.round_dir(round_index)}/global"

    def outer_buffer(self, round_index: int, name: str) -> str:
        """The outer optimizer's buffer ``name`` after round ``round_index - 1``."""
        if not name.isidentifier() or name == "global":
            raise ValueError(f"not a buffer name: {name!r}")
        return f"{self.round_dir(round_index)}/{name}"

    def prediction(self, round_index: int) -> str:
        """The eager prediction of round ``round_index``'s start point."""
        return f"{self.round_dir(round_index)}/prediction"

    def replica_pack(self, round_index: int, replica: int, attempt: int) -> str:
        """Replica ``replica``'s pack of round ``round_index``, attempt ``attempt``."""
        return f"{self.round_dir(round_index)}/replica-{replica}-a{attempt}"

    def opt_state(self, round_index: int, replica: int, attempt: int) -> str:
        """The inner optimizer state that attempt writes (if its loop keeps one)."""
        return f"{self.round_dir(round_index)}/opt-{replica}-a{attempt}.pt"

    def residual(self, round_index: int, replica: int, attempt: int) -> str:
        """The error-feedback residual that attempt writes (a v1 pack)."""
        return f"{self.round_dir(round_index)}/ef-{replica}-a{attempt}"
