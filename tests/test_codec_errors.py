"""Every bad input to the codec gets a typed CodecError with its data, and nothing is lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fleet.codec import load_pack_into, read_manifest, read_pack, write_pack
from fleet.codec import pack as pack_module
from fleet.errors import (
    CodecError,
    DigestMismatchError,
    FleetError,
    LayoutMismatchError,
    ManifestError,
    NonFiniteValuesError,
    NotAPackError,
    UnknownPackFormatError,
    UnsupportedStateError,
    ValuesLengthError,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.fixture
def pack(tmp_path) -> Path:
    path = tmp_path / "pack"
    write_pack(path, _model(), "schema")
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _edit_manifest(pack: Path, **changes) -> None:
    raw = json.loads((pack / "manifest.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del raw[key]
        else:
            raw[key] = value
    (pack / "manifest.json").write_text(json.dumps(raw))


def _assert_model_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed load"


def _fresh_target():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_error_hierarchy_carries_data():
    exc = LayoutMismatchError("p", "torch-layout-a", "torch-layout-b")
    assert isinstance(exc, CodecError) and isinstance(exc, FleetError)
    assert "torch-layout-a" in str(exc) and "torch-layout-b" in str(exc)
    assert exc.to_dict() == {
        "type": "LayoutMismatchError",
        "message": str(exc),
        "data": {
            "path": "p",
            "pack_layout_hash": "torch-layout-a",
            "model_layout_hash": "torch-layout-b",
        },
    }


def test_unknown_format(pack):
    _edit_manifest(pack, format="some-other-format-v9")
    before = _snapshot(pack)
    with pytest.raises(UnknownPackFormatError) as info:
        read_pack(pack)
    assert info.value.format == "some-other-format-v9"
    model, state = _fresh_target()
    with pytest.raises(UnknownPackFormatError):
        load_pack_into(pack, model)
    _assert_model_untouched(model, state)
    assert _snapshot(pack) == before


@pytest.mark.parametrize(
    "key", ["format", "model_schema_hash", "layout_hash", "parameter_count", "values_f32_le"]
)
def test_missing_manifest_key(pack, key):
    _edit_manifest(pack, **{key: ...})
    before = _snapshot(pack)
    with pytest.raises(ManifestError) as info:
        read_manifest(pack)
    assert info.value.key == key and info.value.detail == "missing"
    assert _snapshot(pack) == before


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"parameter_count": "26"}, "parameter_count"),
        ({"parameter_count": -1}, "parameter_count"),
        ({"values_f32_le": "../../etc/passwd"}, "values_f32_le"),
        ({"included_keys": "not-a-list"}, "included_keys"),
    ],
)
def test_mistyped_manifest_value(pack, changes, key):
    _edit_manifest(pack, **changes)
    with pytest.raises(ManifestError) as info:
        read_pack(pack)
    assert info.value.key == key


def test_manifest_not_json(pack):
    (pack / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_pack(pack)


@pytest.mark.parametrize("delta_bytes", [-4, -1, 4])
def test_values_length_mismatch(pack, delta_bytes):
    values = pack / "values.f32le"
    data = values.read_bytes()
    values.write_bytes(data[:delta_bytes] if delta_bytes < 0 else data + b"\0" * delta_bytes)
    before = _snapshot(pack)
    with pytest.raises(ValuesLengthError) as info:
        read_pack(pack)
    assert info.value.expected_bytes == len(data)
    assert info.value.actual_bytes == len(data) + delta_bytes
    model, state = _fresh_target()
    with pytest.raises(ValuesLengthError):
        load_pack_into(pack, model)
    _assert_model_untouched(model, state)
    assert _snapshot(pack) == before


def test_layout_mismatch_names_both_hashes(pack):
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 3))
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LayoutMismatchError) as info:
        load_pack_into(pack, other)
    manifest = read_manifest(pack)
    assert info.value.pack_layout_hash == manifest.layout_hash
    assert info.value.model_layout_hash != manifest.layout_hash
    assert manifest.layout_hash in str(info.value) and info.value.model_layout_hash in str(
        info.value
    )
    _assert_model_untouched(other, state)


def test_dtype_change_is_a_layout_mismatch(pack):
    with pytest.raises(LayoutMismatchError):
        load_pack_into(pack, _model().to(torch.float64))


def test_digest_mismatch(pack):
    values = pack / "values.f32le"
    data = bytearray(values.read_bytes())
    data[5] ^= 0xFF
    values.write_bytes(bytes(data))
    before = _snapshot(pack)
    with pytest.raises(DigestMismatchError) as info:
        read_pack(pack, verify=True)
    assert info.value.expected == read_manifest(pack).values_digest
    assert info.value.actual != info.value.expected
    model, state = _fresh_target()
    with pytest.raises(DigestMismatchError):
        load_pack_into(pack, model, verify=True)
    _assert_model_untouched(model, state)
    assert _snapshot(pack) == before
    read_pack(pack)  # without verify, the bytes are read as they are


def test_non_finite_values_when_asked(tmp_path):
    state = {"a": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.tensor([float("inf")])}
    write_pack(tmp_path / "p", state, "schema")
    read_pack(tmp_path / "p")  # not checked by default
    with pytest.raises(NonFiniteValuesError) as info:
        read_pack(tmp_path / "p", check_finite=True)
    assert (info.value.count, info.value.first_index) == (2, 1)
    target = {"a": torch.zeros(3), "b": torch.zeros(1)}
    with pytest.raises(NonFiniteValuesError):
        load_pack_into(tmp_path / "p", target, check_finite=True)
    assert torch.equal(target["a"], torch.zeros(3))


def test_an_fp16_overflow_is_a_non_finite_values_error(tmp_path):
    """A float16 model whose weights overflowed (65504 is float16's largest value): the
    pack written from it holds inf, and a read with check_finite names how many values
    and the first one's flat index; the largest finite float16 values pass."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).half()
    with torch.no_grad():
        model.weight[1, 2] = 300.0
        model.weight[3, 0] = -500.0
        model.weight.mul_(1000.0)  # float16 arithmetic: +inf and -inf, the rest finite
    assert int(torch.isinf(model.weight).sum()) == 2
    manifest = write_pack(tmp_path / "p", model, "schema")
    offsets, at = {}, 0
    for entry in manifest.layout_entries() or ():
        offsets[entry.name] = at
        at += entry.numel
    assert {e.dtype for e in manifest.layout_entries() or ()} == {"torch.float16"}
    first = offsets["weight"] + 1 * 8 + 2
    _, values = read_pack(tmp_path / "p")  # not checked by default: inf as written
    assert torch.isinf(values).sum() == 2 and values[first] == float("inf")
    with pytest.raises(NonFiniteValuesError) as info:
        read_pack(tmp_path / "p", check_finite=True)
    assert (info.value.count, info.value.first_index) == (2, first)
    # streamed in small blocks, the way the outer step reads: the same count and index
    with (
        pytest.raises(NonFiniteValuesError) as streamed,
        pack_module.PackReader(tmp_path / "p", check_finite=True) as reader,
    ):
        block = torch.empty(5)
        while reader.remaining:
            reader.read_into(block)
    assert (streamed.value.count, streamed.value.first_index) == (2, first)
    target = torch.nn.Linear(8, 4).half()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(NonFiniteValuesError):
        load_pack_into(tmp_path / "p", target, check_finite=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    # no false alarm at the edge of float16's range
    with torch.no_grad():
        model.weight.copy_(torch.full_like(model.weight, 65504.0))
    write_pack(tmp_path / "edge", model, "schema")
    _, edge = read_pack(tmp_path / "edge", check_finite=True)
    assert edge.max() == 65504.0


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_path_not_a_pack(tmp_path, make):
    path = tmp_path / "x"
    if make == "file":
        path.write_text("hi")
    elif make == "empty_dir":
        path.mkdir()
    with pytest.raises(NotAPackError) as info:
        read_pack(path)
    assert info.value.path == str(path)


def test_unsupported_states(tmp_path):
    for bad in [
        42,
        {"model": "not a module"},
        {"modules": {"a.b": torch.nn.Linear(1, 1)}},
        {"modules": {"": torch.nn.Linear(1, 1)}},
        {"w": [1.0, 2.0]},
    ]:
        with pytest.raises(UnsupportedStateError):
            write_pack(tmp_path / "p", bad, "schema")
    assert not (tmp_path / "p").exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_no_pack(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pack_module._write_all

    def crash_on_second_chunk(f, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(f, data)

    monkeypatch.setattr(pack_module, "_write_all", crash_on_second_chunk)
    with pytest.raises(OSError, match="simulated"):
        write_pack(tmp_path / "p", _model(), "schema")
    assert list(tmp_path.iterdir()) == [], "neither the pack nor its temp dir may remain"


def test_interrupted_rewrite_keeps_the_old_pack(pack, monkeypatch):
    before = _snapshot(pack)

    def crash(f, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_module, "_write_all", crash)
    other = _model()
    with torch.no_grad():
        other[0].weight.fill_(3.0)
    with pytest.raises(KeyboardInterrupt):
        write_pack(pack, other, "schema")
    assert _snapshot(pack) == before
    assert sorted(p.name for p in pack.parent.iterdir()) == ["pack"]


def test_refuses_to_replace_a_directory_that_is_not_a_pack(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("precious")
    with pytest.raises(CodecError, match="not a pack"):
        write_pack(precious, _model(), "schema")
    assert (precious / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_reader_never_sees_a_half_written_pack(tmp_path, monkeypatch):
    """While the values are being written, the destination does not exist yet."""
    seen: list[bool] = []
    real = pack_module._write_all

    def spy(f, data):
        seen.append((tmp_path / "p").exists())
        real(f, data)

    monkeypatch.setattr(pack_module, "_write_all", spy)
    write_pack(tmp_path / "p", _model(), "schema")
    assert seen and not any(seen)
    assert os.path.isfile(tmp_path / "p" / "manifest.json")


def test_from_safetensors_of_a_bad_file(tmp_path):
    from fleet.codec import from_safetensors

    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CodecError, match="cannot read safetensors"):
        from_safetensors(tmp_path / "bad.safetensors", tmp_path / "p", "schema")
    assert not (tmp_path / "p").exists()
