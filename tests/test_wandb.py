"""``fleet diloco --tracker wandb:PROJECT`` on real workers, offline (no WANDB_API_KEY):
the run's ``.wandb`` file is read back record by record (W&B's own protobuf schema over
the LevelDB log format it writes) and holds the job's flattened config and one history
row per round at step ``round + 1``."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.local import worker_env
from tests.harness import DIGITS, REPO

pytest.importorskip("wandb", reason="the wandb extra is not installed")

#: The LevelDB log format of W&B's transaction log (``.wandb``): a 7-byte file header
#: (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte
#: header (CRC-32 seeded with the record type, length, type).
HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[bytes]:
    """The payloads of a ``.wandb`` file's records, each checked against its CRC."""
    data = path.read_bytes()
    ident, magic, _version = HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    pos, pending = HEADER.size, b""
    while pos + RECORD.size <= len(data):
        if BLOCK - pos % BLOCK < RECORD.size:  # a block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = RECORD.unpack_from(data, pos)
        payload = data[pos + RECORD.size : pos + RECORD.size + length]
        pos += RECORD.size + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"bad record at {pos}"
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload


def read_offline_run(run_dir: Path) -> dict[str, object]:
    """An offline run's id, name, project, config and history rows (``{"_step": n,
    name: value}``) from its ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    [log_file] = run_dir.glob("run-*.wandb")
    out: dict[str, object] = {"config": {}, "history": []}
    config: dict[str, object] = {}
    history: list[dict[str, object]] = []
    for payload in wandb_records(log_file):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out |= {
                "id": record.run.run_id,
                "name": record.run.display_name,
                "project": record.run.project,
            }
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history.append(row | {"_step": record.history.step.num})
    out["config"], out["history"] = config, history
    return out


def test_a_diloco_job_logs_its_config_and_rounds_to_an_offline_wandb_run(
    fleet_settings, two_workers, tmp_path
):
    env = worker_env(fleet_settings, [str(REPO)])
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        env.pop(name, None)
    env["WANDB_DIR"] = str(tmp_path / "wb")
    (tmp_path / "wb").mkdir()
    cmd = [sys.executable, "-m", "fleet", "diloco", "--workload", DIGITS, "--rounds", "3"]
    cmd += ["--inner-steps", "4", "--outer-lr", "0.7", "--tracker", "wandb:fleet-tests"]
    out = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("job ", 1)[1].split()[0]

    [run_dir] = (tmp_path / "wb" / "wandb").glob(f"offline-run-*-{job_id}")
    run = read_offline_run(run_dir)
    assert (run["id"], run["name"], run["project"]) == (job_id, job_id, "fleet-tests")
    config = run["config"]
    assert isinstance(config, dict)
    assert config["rounds"] == 3 and config["inner_steps"] == 4 and config["workload"] == DIGITS
    assert config["outer.lr"] == 0.7, "nested config flattened as MLflow's params are"
    history = run["history"]
    assert isinstance(history, list)
    assert [row["_step"] for row in history] == [1, 2, 3], "one row per round, at round + 1"
    for row in history:
        for name in ("eval/loss", "train/loss", "round/wall_s", "replicas/merged"):
            assert isinstance(row[name], float | int), (name, row)
    from fleet.diloco.state import rounds_of
    from fleet.jobs import JobStore

    records = rounds_of(JobStore.from_settings(fleet_settings), job_id)
    assert [row["eval/loss"] for row in history] == pytest.approx(
        [r.eval.loss for r in records if r.eval is not None]
    ), "the committed rounds' eval losses"
    assert [row["replicas/merged"] for row in history] == [2, 2, 2]
