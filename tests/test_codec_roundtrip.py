"""Round trips of the pack codec over every state shape, dtype and edge case."""

from __future__ import annotations

import json

import pytest
import torch

from fleet.codec import (
    PackManifest,
    from_safetensors,
    layout_of,
    load_pack_into,
    read_pack,
    to_safetensors,
    write_pack,
)
from fleet.codec.pack import CONVERT_CHUNK_NUMEL


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(5, 3).to(dtype)
        self.norm = torch.nn.BatchNorm1d(3).to(dtype)
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False]))


def _randomize(state) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in _tensors(state).values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))


def _tensors(state) -> dict[str, torch.Tensor]:
    from fleet.codec.layout import named_tensors

    return dict(named_tensors(state))


def _clone_zeroed(state_factory):
    target = state_factory()
    with torch.no_grad():
        for t in _tensors(target).values():
            if t.is_floating_point():
                t.zero_()
    return target


def _assert_same(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if ta[key].is_floating_point():
            assert ta[key].dtype == tb[key].dtype, key
            assert torch.equal(ta[key], tb[key]), key


STATES = {
    "module": lambda: Net(),
    "model_dict": lambda: {"model": Net(), "optimizer": "ignored", "step": 3},
    "modules": lambda: {"modules": {"encoder": Net(), "head": torch.nn.Linear(3, 2)}},
    "mapping": lambda: {
        "w": torch.zeros(4, 2),
        "b": torch.zeros(2),
        "n": torch.zeros(1, dtype=torch.int32),
    },
}


@pytest.mark.parametrize("kind", list(STATES))
def test_roundtrip_state_shapes(kind, tmp_path):
    source = STATES[kind]()
    _randomize(source)
    manifest = write_pack(tmp_path / "p", source, "schema")
    target = _clone_zeroed(STATES[kind])
    load_pack_into(tmp_path / "p", target, verify=True)
    _assert_same(source, target)
    assert manifest.layout_hash == layout_of(target).layout_hash


def test_modules_are_walked_in_sorted_name_order():
    state = {"modules": {"zeta": torch.nn.Linear(1, 1), "alpha": torch.nn.Linear(1, 1)}}
    assert layout_of(state).included_keys == (
        "alpha.bias",
        "alpha.weight",
        "zeta.bias",
        "zeta.weight",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_roundtrip_dtypes(dtype, tmp_path):
    source = Net(dtype)
    _randomize(source)
    write_pack(tmp_path / "p", source, "schema")
    manifest, flat = read_pack(tmp_path / "p", verify=True)
    assert flat.dtype == torch.float32
    expected = torch.cat(
        [source.state_dict()[k].reshape(-1).float() for k in manifest.included_keys]
    )
    assert torch.equal(flat, expected)
    target = Net(dtype)
    load_pack_into(tmp_path / "p", target)
    if dtype == torch.float64:  # float64 -> float32 -> float64 loses precision, by the format
        for k in manifest.included_keys:
            assert torch.equal(target.state_dict()[k], source.state_dict()[k].float().double())
    else:  # half types are exact through float32
        _assert_same(source, target)


def test_non_contiguous_tensors(tmp_path):
    base = torch.randn(6, 8)
    state = {"t": base.t(), "s": base[:, ::2]}
    assert not state["t"].is_contiguous() and not state["s"].is_contiguous()
    write_pack(tmp_path / "p", state, "schema")
    _, flat = read_pack(tmp_path / "p")
    assert torch.equal(flat, torch.cat([base[:, ::2].reshape(-1), base.t().reshape(-1)]))
    target = {"t": torch.zeros(6, 8).t(), "s": torch.zeros(6, 8)[:, ::2]}
    load_pack_into(tmp_path / "p", target)
    assert torch.equal(target["t"], base.t()) and torch.equal(target["s"], base[:, ::2])


def test_empty_tensors(tmp_path):
    state = {"a": torch.empty(0), "b": torch.ones(3), "c": torch.empty(2, 0)}
    manifest = write_pack(tmp_path / "p", state, "schema")
    assert manifest.parameter_count == 3
    assert manifest.included_keys == ["a", "b", "c"]
    target = {"a": torch.empty(0), "b": torch.zeros(3), "c": torch.empty(2, 0)}
    load_pack_into(tmp_path / "p", target)
    assert torch.equal(target["b"], torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_larger_than_a_chunk(dtype, tmp_path):
    n = 64 * 1024 + 1
    big = CONVERT_CHUNK_NUMEL * 2 + 3  # crosses the writer's conversion chunks
    state = {
        "a": torch.randn(n).to(dtype),
        "b": torch.randn(big).to(dtype),
        "c": torch.randn(7).to(dtype),
    }
    write_pack(tmp_path / "p", state, "schema")
    _, flat = read_pack(tmp_path / "p", mmap=True)
    assert torch.equal(flat, torch.cat([state[k].float() for k in ("a", "b", "c")]))
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    load_pack_into(tmp_path / "p", target, verify=True)
    for k in state:
        assert torch.equal(target[k], state[k])


def test_non_float_buffers_are_ignored_and_untouched(tmp_path):
    source = Net()
    manifest = write_pack(tmp_path / "p", source, "schema")
    assert manifest.ignored_non_float_keys == ["mask", "norm.num_batches_tracked", "steps"]
    assert "steps" not in manifest.included_keys
    target = Net()
    target.steps.fill_(9)
    load_pack_into(tmp_path / "p", target)
    assert target.steps.tolist() == [9, 9, 9]


def test_filter_excludes_keys(tmp_path):
    source = Net()
    sdf = {"include_globs": ["fc.*"], "exclude_globs": ["*.bias"]}
    manifest = write_pack(tmp_path / "p", source, "schema", state_dict_filter=sdf)
    assert manifest.included_keys == ["fc.weight"]
    assert (
        "fc.bias" in manifest.excluded_float_keys and "norm.weight" in manifest.excluded_float_keys
    )
    assert manifest.state_dict_filter is not None
    assert manifest.state_dict_filter.include_globs == ("fc.*",)


def test_manifest_has_digest_and_layout_and_unknown_keys_are_accepted(tmp_path):
    write_pack(tmp_path / "p", Net(), "schema")
    raw = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert raw["values_digest"].startswith("xxh3_64:")
    assert raw["layout"][0] == {
        "name": "fc.bias",
        "shape": [3],
        "dtype": "torch.float32",
        "numel": 3,
    }
    raw["some_future_key"] = {"x": 1}
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(raw))
    manifest, _ = read_pack(tmp_path / "p", verify=True)
    assert isinstance(manifest, PackManifest)


def test_rewrite_replaces_the_pack(tmp_path):
    a, b = Net(), Net()
    _randomize(b)
    write_pack(tmp_path / "p", a, "schema")
    write_pack(tmp_path / "p", b, "schema")
    target = Net()
    load_pack_into(tmp_path / "p", target, verify=True)
    _assert_same(b, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_safetensors_roundtrip(tmp_path):
    source = {"modules": {"enc": Net(torch.bfloat16), "head": torch.nn.Linear(3, 2)}}
    _randomize(source)
    write_pack(tmp_path / "p", source, "schema-x")
    to_safetensors(tmp_path / "p", tmp_path / "m.safetensors")
    manifest = from_safetensors(tmp_path / "m.safetensors", tmp_path / "q")  # schema from metadata
    assert manifest.model_schema_hash == "schema-x"
    assert (tmp_path / "p" / "values.f32le").read_bytes() == (
        tmp_path / "q" / "values.f32le"
    ).read_bytes()
    target = {"modules": {"enc": Net(torch.bfloat16), "head": torch.nn.Linear(3, 2)}}
    load_pack_into(tmp_path / "q", target)
    _assert_same(source, target)


def test_safetensors_from_a_pack_without_layout_needs_a_template(conformance_dir, tmp_path):
    from safetensors.torch import load_file

    from fleet.errors import MissingLayoutError

    pack = conformance_dir / "basic" / "pack"
    with pytest.raises(MissingLayoutError):
        to_safetensors(pack, tmp_path / "m.safetensors")
    like = load_file(conformance_dir / "basic" / "state_dict.safetensors")
    to_safetensors(pack, tmp_path / "m.safetensors", like=like)
    out = load_file(tmp_path / "m.safetensors")
    for key in out:
        assert torch.equal(out[key], like[key])


def test_read_pack_into_a_preallocated_buffer(tmp_path):
    state = {"a": torch.randn(10), "b": torch.randn(3, 2)}
    write_pack(tmp_path / "p", state, "schema")
    out = torch.empty(16)
    _, values = read_pack(tmp_path / "p", out=out)
    assert values.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.cat([state["a"], state["b"].reshape(-1)]))
    with pytest.raises(ValueError, match="16 elements"):
        read_pack(tmp_path / "p", out=torch.empty(15))
