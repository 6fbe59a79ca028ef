"""Every error of :mod:`fleet.errors`, built from sample values, against a golden record.

The record (``tests/golden/errors.json``) holds, per sample: the class's bases and
``fields``, its constructor's parameters, ``str()``, ``to_dict()`` (the JSON on the
wire), the attributes it carries, what survives a pickle round trip (Celery's prefork
pool pickles errors from child to parent), and the error a caller rebuilds from the
wire (:func:`fleet.errors.remote_error`). It was generated from the errors module as
it was before the module was declared field by field, so any change to what goes on
the wire shows up as a diff here.

A new error class needs a sample in :data:`SAMPLES`; then regenerate the record with
``FLEET_WRITE_GOLDEN=1 pytest tests/test_errors_wire.py`` and read the diff: it must
only add the new class.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from fleet import errors

GOLDEN = Path(__file__).parent / "golden" / "errors.json"

#: ``(class name, positional args, keyword args)``; several per class where the
#: message has branches.
SAMPLES: list[tuple[str, list[Any], dict[str, Any]]] = [
    ("FleetError", ["something failed"], {}),
    ("CodecError", ["cannot read it"], {}),
    ("CodecError", ["cannot read it"], {"path": "runs/a/pack"}),
    ("NotAPackError", ["runs/a/pack", "no manifest.json"], {}),
    ("UnknownPackFormatError", ["runs/a/pack", "v9", "pack-v1"], {}),
    ("ManifestError", ["runs/a/pack", "layout_hash", "missing"], {}),
    ("ManifestError", ["runs/a/pack", None, "not valid JSON"], {}),
    ("ValuesLengthError", ["runs/a/pack/values.f32le", 400, 396], {}),
    ("LayoutMismatchError", ["runs/a/pack", "torch-layout-a", "torch-layout-b"], {}),
    ("DigestMismatchError", ["runs/a/pack", "xxh3:aa", "xxh3:bb"], {}),
    ("BaseMismatchError", ["runs/a/round-0001/replica-0-a0", "xxh3:aa", "xxh3:bb"], {}),
    ("GlobalDigestMismatchError", ["/cache/diloco/j", 3, "xxh3:aa", "xxh3:bb"], {}),
    ("NonFiniteValuesError", ["runs/a/pack", 3, 17], {}),
    ("UnsupportedStateError", ["state dict value 'w' is int"], {}),
    ("MissingLayoutError", ["runs/a/pack"], {}),
    ("ArtifactError", ["art.safetensors"], {}),
    (
        "ArtifactError",
        ["art.safetensors"],
        {
            "missing": [f"m{i}" for i in range(7)],
            "unexpected": ["u0"],
            "mismatched": {f"w{i}": "[2] vs [3]" for i in range(6)},
            "detail": "and more",
        },
    ),
    ("StorageError", ["nothing was written to publish at x"], {}),
    ("StorageError", ["nothing was written to publish at x"], {"path": "runs/a/x"}),
    ("PathOutsideRootError", ["../etc/passwd", "/shared"], {}),
    ("StorageFullError", ["runs/a/pack"], {}),
    ("StorageFullError", ["runs/a/pack", "EDQUOT"], {}),
    ("StorageIOError", ["runs/a/pack", "EACCES", "Permission denied"], {}),
    ("StorageIOError", [None, "EIO", "Input/output error"], {}),
    ("StorageUnavailableError", ["s3://b/root", "read", "ConnectTimeoutError", 90.0], {}),
    ("DatasetError", ["dataset broken"], {"path": "data/a"}),
    ("DatasetFormatError", ["data/a", "no microshards"], {}),
    ("ShardMissingError", ["data/a", "ms-1", "data/a/ms-1.bin"], {}),
    ("ShardSizeMismatchError", ["data/a", "ms-1", 100, 90], {}),
    ("ShardHashMismatchError", ["data/a", "ms-1", "1220aa", "1220bb"], {}),
    ("DatasetPathError", ["data/a"], {}),
    ("DatasetPathError", ["data/a", "../x.bin"], {}),
    ("DatasetPathError", ["data/a", "/mnt/x.bin"], {"data_roots": ["/data", "/scratch"]}),
    ("ProtocolError", ["run_inner_loop returned no pack"], {}),
    (
        "RequestValidationError",
        [
            "train_window",
            [
                {"loc": ["batches", 0], "msg": "field required", "type": "missing"},
                {"loc": [], "msg": "bad body", "type": "value_error"},
            ],
        ],
        {},
    ),
    ("UnknownMethodError", ["train_everything"], {}),
    ("MetricValueError", ["evaluate", "loss", "list"], {}),
    ("StepBudgetError", [7, 10], {}),
    (
        "RejectedMessageError",
        ["pickle refused"],
        {"content_type": "application/x-python-serialize", "queue": "fleet.gpu", "task_id": "t1"},
    ),
    ("RejectedMessageError", ["not JSON"], {"content_type": None, "queue": None, "task_id": None}),
    ("WorkloadError", ["workload broken"], {}),
    ("WorkloadError", ["workload broken"], {"spec": "lab.lm:make"}),
    ("BadFactorySpecError", ["lab.lm"], {}),
    ("NotAllowlistedError", ["evil:make", ["lab.*:*"]], {}),
    ("FactoryLoadError", ["lab.lm:make", "ImportError: no module lab"], {}),
    ("NoWorkloadError", [], {}),
    ("HookMissingError", ["lab.lm:make", "evaluate"], {}),
    (
        "HookFailedError",
        ["lab.lm:make", "train_window", "ValueError", "bad batch", "Traceback ..."],
        {},
    ),
    ("WorkloadDataError", ["train_data", "no batches for shards ['a']"], {}),
    ("RegistryError", ["registry broken"], {}),
    ("HandleNotFound", ["m-1"], {}),
    ("HandleNotFound", ["m-1"], {"worker": "fleet-cpu0@n", "record": {"owner": "fleet-cpu1@n"}}),
    ("OwnerLostError", ["m-1", "fleet-cpu1@n", {"path": "tmp/m-1", "layout_hash": "h"}], {}),
    ("OwnerLostError", ["m-1", "fleet-cpu1@n", None], {}),
    ("WorkerNotFound", ["fleet-gpu3@n"], {}),
    ("NoWorkersError", [2, 1, 0.0], {}),
    ("NoWorkersError", [2, 0, 30.0], {}),
    ("WorkerSlotTakenError", ["fleet-cpu0@n", 1234, "n", 1.25], {}),
    ("TrainingStopped", ["t1", 5, "budget"], {}),
    ("TaskAborted", ["t1", 5], {}),
    ("DeadlineExceeded", [None, 9], {}),
    ("JobError", ["job broken"], {}),
    ("JobNotFound", ["j1"], {}),
    ("JobStateError", ["j1", "completed", "running"], {}),
    ("RoundFailed", [3, ["r0: StepBudgetError", "r1: HookFailedError"]], {}),
    ("CorruptCheckpointError", ["j1", 2, "runs/j1/global/r2", "digest mismatch"], {}),
    ("FragmentSplitError", [3000, 4, 1024], {}),
    ("JobCancelled", ["j1"], {}),
    ("JobOwnedError", ["j1", "n", 77, 2.5], {}),
    ("FencedOutError", ["j1", 3, 4], {}),
    ("FencedOutError", ["j1", 3, None], {}),
    ("ConfigError", ["config broken"], {}),
    ("RunConfigError", ["run.toml", "rounds: must be > 0"], {}),
    ("TrackerError", ["wandb", "wandb is not installed"], {}),
    ("BrokerUnavailableError", ["redis://localhost:6379/0", "Connection refused"], {}),
    (
        "RemoteTaskError",
        ["hello", "fleet-cpu0@n", "t1", "KeyError", "'x'", {"a": 1}, "Traceback ..."],
        {},
    ),
    ("RemoteTaskError", ["hello", None, "t1", "KeyError", "'x'", None, None], {}),
    ("FleetTimeout", ["train_window", "t1", 2.5], {}),
]


def _json(value: Any) -> Any:
    """``value`` as the JSON it writes (anything else by its repr), read back."""
    return json.loads(json.dumps(value, default=repr, sort_keys=True))


def _carried(exc: BaseException) -> dict[str, Any]:
    """What an error carries: its attributes, and its OSError slots if it is one."""
    out: dict[str, Any] = {"type": type(exc).__name__, "args": list(exc.args)}
    out["attributes"] = dict(vars(exc))
    if isinstance(exc, OSError):
        out["os_error"] = {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
    return out


def _signature(cls: type) -> list[list[Any]]:
    """``[name, kind, default]`` of each constructor parameter (annotations left out)."""
    params = inspect.signature(cls).parameters.values()
    return [
        [p.name, p.kind.name, None if p.default is p.empty else repr(p.default)] for p in params
    ]


def _remote(exc: errors.FleetError) -> dict[str, Any]:
    """The error a caller rebuilds from ``exc`` on the wire, and its pickle round trip."""
    data = exc.to_dict()["data"]
    try:
        rebuilt = errors.remote_error(
            method="train_window",
            worker="fleet-cpu0@n",
            task_id="t1",
            error_type=type(exc).__name__,
            error=str(exc),
            data=data,
            remote_traceback="Traceback ...",
        )
    except Exception as failed:  # recorded, so a fix shows up as a diff
        return {"raises": f"{type(failed).__name__}: {failed}"}
    back = pickle.loads(pickle.dumps(rebuilt))
    return {
        "str": str(rebuilt),
        "is_original_class": isinstance(rebuilt, type(exc)),
        "is_remote": isinstance(rebuilt, errors.RemoteTaskError),
        "fields": list(type(rebuilt).fields),
        "to_dict": rebuilt.to_dict(),
        "carried": _carried(rebuilt),
        "unpickled_is_same_class": type(back) is type(rebuilt),
        "unpickled_to_dict": back.to_dict(),
    }


def _record(name: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    cls = getattr(errors, name)
    exc = cls(*args, **kwargs)
    back = pickle.loads(pickle.dumps(exc))
    return _json(
        {
            "class": name,
            "args": args,
            "kwargs": kwargs,
            "bases": [b.__name__ for b in cls.__bases__],
            "fields": list(cls.fields),
            "signature": _signature(cls),
            "str": str(exc),
            "to_dict": exc.to_dict(),
            "carried": _carried(exc),
            "unpickled": {"to_dict": back.to_dict(), "carried": _carried(back)},
            "remote": _remote(exc),
        }
    )


def _fleet_errors() -> list[str]:
    return sorted(
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, errors.FleetError)
    )


def _records() -> list[dict[str, Any]]:
    return [_record(*sample) for sample in SAMPLES]


def test_every_error_class_has_a_sample():
    sampled = {name for name, _, _ in SAMPLES}
    assert sorted(set(_fleet_errors()) - sampled) == [], "add a sample to SAMPLES"


def test_every_error_matches_the_golden_record():
    if os.environ.get("FLEET_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(_records(), indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    records = _records()
    assert [r["class"] for r in records] == [g["class"] for g in golden], "samples changed"
    for record, expected in zip(records, golden, strict=True):
        assert record == expected, f"{record['class']}{record['args']} differs from the golden"


@pytest.mark.parametrize("name", _fleet_errors())
def test_the_wire_data_is_the_fields_and_survives_json(name):
    """``to_dict()["data"]`` has exactly the class's ``fields``, in order, and is JSON."""
    cls = getattr(errors, name)
    for sample_name, args, kwargs in SAMPLES:
        if sample_name != name:
            continue
        wire = cls(*args, **kwargs).to_dict()
        assert list(wire["data"]) == list(cls.fields)
        assert json.loads(json.dumps(wire)) == wire


def test_a_workload_data_error_leaving_a_hook_names_its_workload():
    """A data source does not know its workload's spec: the hook call fills it in."""
    from fleet.workload import Workload

    class NoData:
        def train_window(self) -> None:
            raise errors.WorkloadDataError("train_data", "no batches")

    with pytest.raises(errors.WorkloadDataError) as info:
        Workload("lab.lm:make", {}, NoData()).call("train_window")
    assert info.value.to_dict()["data"] == {
        "spec": "lab.lm:make",
        "source": "train_data",
        "detail": "no batches",
    }
    given = errors.WorkloadDataError("eval_data", "empty", spec="lab.lm:other")
    assert given.spec == "lab.lm:other" and str(given) == "eval_data: empty"


def test_every_storage_error_names_its_path_or_none():
    """``exc.path`` on any StorageError, on the wire too (no ``getattr`` fallback)."""
    for name, args, kwargs in SAMPLES:
        cls = getattr(errors, name)
        if issubclass(cls, errors.StorageError):
            exc = cls(*args, **kwargs)
            assert exc.fields[0] == "path" and exc.to_dict()["data"]["path"] == exc.path
    assert errors.StorageError("gone", path="runs/a").path == "runs/a"
    assert errors.StorageError("gone").path is None


class DeclaredInATestError(errors.JobError):
    """An error declared as a new one would be (at module level: pickle finds it)."""

    job_id: str
    lease_id: str
    attempt: int | None = errors.field(default=None, kw_only=True)
    template = "job {job_id}: lease {lease_id} expired (attempt {attempt})"


def test_a_new_error_is_declared_once_and_gets_the_rest():
    """What a new error gets from its declaration: constructor, fields, message,
    wire form, pickling and the caller-side rebuild."""
    assert DeclaredInATestError.fields == ("job_id", "lease_id", "attempt")
    assert str(inspect.signature(DeclaredInATestError)) == "(job_id, lease_id, *, attempt=None)"
    exc = DeclaredInATestError("j1", "l7", attempt=2)
    assert str(exc) == "job j1: lease l7 expired (attempt 2)" and exc.args == (str(exc),)
    wire = {"job_id": "j1", "lease_id": "l7", "attempt": 2}
    assert exc.to_dict() == {"type": "DeclaredInATestError", "message": str(exc), "data": wire}
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is DeclaredInATestError and back.to_dict() == exc.to_dict()
    with pytest.raises(TypeError):
        DeclaredInATestError("j1", "l7", 2)  # attempt is keyword-only
    rebuilt = errors.remote_error(
        method="m", worker="w", task_id="t", error_type="DeclaredInATestError", error=str(exc),
        data=wire, remote_traceback=None,
    )  # fmt: skip
    assert isinstance(rebuilt, DeclaredInATestError) and isinstance(rebuilt, errors.RemoteTaskError)
    assert (rebuilt.lease_id, rebuilt.attempt, rebuilt.worker) == ("l7", 2, "w")


def test_a_bad_declaration_fails_when_the_class_is_made():
    with pytest.raises(TypeError, match="template"):

        class NamesNoField(errors.JobError):
            job_id: str
            template = "job {job}"

    with pytest.raises(TypeError, match="template"):

        class NoMessage(errors.JobError):
            job_id: str

    with pytest.raises(ValueError, match="default"):

        class OutOfOrder(errors.JobError):
            job_id: str = "j"
            round: int
            template = "{job_id} {round}"


@pytest.mark.parametrize("name", _fleet_errors())
def test_a_rebuild_from_partial_data_never_fails(name):
    """A worker of another version may send fewer fields: the caller still gets the
    error, with what it did send."""
    rebuilt = errors.remote_error(
        method="m", worker="w", task_id="t", error_type=name, error="boom", data={},
        remote_traceback=None,
    )  # fmt: skip
    assert (
        isinstance(rebuilt, errors.RemoteTaskError)
        and str(rebuilt) == f"m failed on w: {name}: boom"
    )
