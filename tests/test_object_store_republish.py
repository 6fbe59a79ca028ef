"""A pack re-published on an object store (``s3://``, a real SeaweedFS): the old manifest
is deleted before any new object is written, so an upload cut short leaves no pack at
that path, never the old manifest over new or partial values
(:meth:`fleet.storage.object_store.ObjectStore.upload`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleet.codec import write_pack
from fleet.errors import NotAPackError
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.storage.object_store import ObjectStore
from tests.harness import REPO, wait_until

#: Re-publishes a pack of 128 MiB of values at argv[4]: more than s3fs's 50 MiB part
#: size, so the values go up as a multipart upload that can be seen and cut short.
_REPUBLISH = """
import json, sys, torch
from fleet.codec import write_pack
from fleet.settings import FleetSettings
from fleet.storage import open_store
options = json.loads(sys.argv[2])
settings = FleetSettings(shared_root=sys.argv[1], storage_options=options, cache_dir=sys.argv[3])
store = open_store(settings)
with store.output(sys.argv[4]) as local:
    write_pack(local, {"w": torch.ones(32 << 20)}, "schema")
print("uploaded", flush=True)
"""


def _store(s3_server, root: str, cache_dir: Path) -> ObjectStore:
    settings = FleetSettings(
        shared_root=root, storage_options=s3_server.storage_options, cache_dir=cache_dir
    )
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    return store


def test_a_re_publish_cut_short_leaves_no_pack_not_the_old_manifest(s3_server, s3_root, tmp_path):
    store = _store(s3_server, s3_root, tmp_path / "cache")
    bucket = s3_root.split("/")[2]
    rel = "runs/j/round-0003/global"
    with store.output(rel) as local:
        write_pack(local, {"w": torch.zeros(1000)}, "schema")
    old = store.pack_ref(rel)
    assert store.read_manifest(rel).parameter_count == 1000

    proc = subprocess.Popen(
        [sys.executable, "-c", _REPUBLISH, s3_root, json.dumps(s3_server.storage_options),
         str(tmp_path / "writer-cache"), rel],
        cwd=REPO, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:

        def uploading() -> bool:
            assert proc.poll() is None, "the upload finished before it could be cut short"
            return bool(store.fs.list_multipart_uploads(bucket))

        wait_until(uploading, 120, "the values' multipart upload started", interval_s=0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the writer dies mid-upload
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the old manifest went first: the path is no pack, not the old one
    with pytest.raises(NotAPackError):
        store.read_manifest(rel)
    with pytest.raises(NotAPackError):
        store.pack_ref(rel)
    fresh = _store(s3_server, s3_root, tmp_path / "reader-cache")
    with pytest.raises(NotAPackError):
        fresh.local_pack(rel, old)
    # a complete re-publish afterwards is the new pack
    with store.output(rel) as local:
        write_pack(local, {"w": torch.ones(7)}, "schema")
    new = store.pack_ref(rel)
    assert new.values_digest != old.values_digest
    assert store.read_manifest(rel).parameter_count == 7
