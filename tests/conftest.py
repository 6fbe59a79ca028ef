"""Shared fixtures. Servers the tests need (redis-server) are started privately."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLEET_SHARED_DOCS", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    path = SHARED / "conformance" / "pack-v1"
    if not path.is_dir():
        pytest.fail(f"conformance vectors not found at {path} (set FLEET_SHARED_DOCS)")
    return path
