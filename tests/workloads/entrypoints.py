"""Entrypoints for the executor tests."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("tests.entrypoints")


def train(steps: int = 3) -> dict[str, int]:
    rank = int(os.environ["REPLICA_RANK"])
    for step in range(steps):
        print(f"rank {rank} step {step}")
    log.info("rank %d done", rank)
    return {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "steps": steps}


def custom_rank(name: str = "MY_RANK") -> str:
    return os.environ[name]


def boom() -> None:
    print("about to fail")
    raise ValueError("replica exploded")


def sleepy(seconds: float = 30.0) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        print("still sleeping")
        time.sleep(0.05)
    return "woke"
