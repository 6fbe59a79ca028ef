"""Content hashes of microshards as burn_p2p writes them (sha2-256 multihash, hex), and
:class:`ShardChecker`, which checks a shard the first time a process reads it. A leaf
module: the stores check shards with it while they fetch them.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import IO

from fleet.errors import ShardHashMismatchError, ShardMissingError

#: Multihash prefix of a sha2-256 digest (code 0x12, length 0x20), in hex.
SHA256_MULTIHASH = "1220"


def hash_stream(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return SHA256_MULTIHASH + digest.hexdigest()


def shard_hash(path: Path) -> str:
    """The content hash of a file as burn_p2p writes it: sha2-256 multihash, hex."""
    with open(path, "rb") as f:
        return hash_stream(f)


class ShardChecker:
    """Checks shards' content hashes the first time this process reads them (a shard is
    checked again only if its size or modification time changed)."""

    def __init__(self) -> None:
        self._checked: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()

    def check(self, dataset: str, microshard_id: str, path: Path, expected: str) -> None:
        """Raises:
        ShardHashMismatchError: the file's content hash is not ``expected``.
        ShardMissingError: the file is gone."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ShardMissingError(dataset, microshard_id, str(path)) from None
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key in self._checked:
                return
        actual = shard_hash(path)
        if actual != expected.lower():
            raise ShardHashMismatchError(dataset, microshard_id, expected, actual)
        with self._lock:
            self._checked.add(key)
