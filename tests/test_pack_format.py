"""v1 packs beyond the round trip: a load checks what a ref recorded and uses the
manifest's filter unless given one; safetensors conversion keeps the pack's identity in
its metadata, verifies by default and names what it refuses; fleet's default model
artifact (the whole state dict as safetensors) loads back exactly or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fleet.codec
from fleet.codec import (
    from_safetensors,
    layout_of,
    load_pack_into,
    read_manifest,
    to_safetensors,
    write_pack,
)
from fleet.codec.convert import load_state_artifact, save_state_artifact
from fleet.errors import (
    ArtifactError,
    CodecError,
    DigestMismatchError,
    LayoutMismatchError,
    MissingLayoutError,
)

NO_BIAS = {"include_globs": [], "exclude_globs": ["*.bias"]}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model[1].to(torch.float64)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _flip(pack: Path) -> None:
    data = bytearray((pack / "values.f32le").read_bytes())
    data[5] ^= 0x20
    (pack / "values.f32le").write_bytes(bytes(data))


def test_a_load_checks_the_refs_layout_hash_and_digest_first(tmp_path):
    pack = tmp_path / "p"
    manifest = write_pack(pack, _model(1), "s")
    target = _model(2)
    before = _state(target)
    other = "torch-layout-" + "0" * 64
    with pytest.raises(LayoutMismatchError) as layout:
        load_pack_into(pack, target, layout_hash=other)
    assert layout.value.path == str(pack)
    assert {layout.value.pack_layout_hash, layout.value.model_layout_hash} == {
        manifest.layout_hash,
        other,
    }
    wrong = "xxh3_64:" + "0" * 16
    with pytest.raises(DigestMismatchError) as digest:
        load_pack_into(pack, target, values_digest=wrong)
    assert digest.value.path == str(pack) and wrong in (digest.value.expected, digest.value.actual)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    load_pack_into(
        pack, target, layout_hash=manifest.layout_hash, values_digest=manifest.values_digest
    )
    assert all(torch.equal(v, _model(1).state_dict()[k]) for k, v in target.state_dict().items())


def test_a_load_into_another_model_names_both_layouts(tmp_path):
    pack = tmp_path / "p"
    manifest = write_pack(pack, _model(), "s")
    other = torch.nn.Linear(4, 3)
    with pytest.raises(LayoutMismatchError) as info:
        load_pack_into(pack, other)
    assert info.value.path == str(pack)
    assert info.value.pack_layout_hash == manifest.layout_hash
    assert info.value.model_layout_hash == layout_of(other).layout_hash


def test_a_load_uses_the_manifests_filter_unless_given_one(tmp_path):
    pack = tmp_path / "p"
    write_pack(pack, _model(1), "s", state_dict_filter=NO_BIAS)
    target = _model(2)
    bias = target[0].bias.detach().clone()
    load_pack_into(pack, target)  # the recorded filter: biases are not in the pack
    assert torch.equal(target[0].weight, _model(1)[0].weight)
    assert torch.equal(target[0].bias, bias)
    with pytest.raises(LayoutMismatchError):  # every key: not the pack's layout
        load_pack_into(pack, _model(2), state_dict_filter={})


def test_safetensors_keep_the_packs_identity_and_verify_it_by_default(tmp_path):
    pack = tmp_path / "p"
    manifest = write_pack(pack, _model(), "schema-7")
    to_safetensors(pack, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {
            "format": manifest.format,
            "model_schema_hash": "schema-7",
            "layout_hash": manifest.layout_hash,
        }
        assert f.get_tensor("1.running_var").dtype == torch.float64
    _flip(pack)
    with pytest.raises(DigestMismatchError):
        to_safetensors(pack, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    to_safetensors(pack, tmp_path / "unchecked.safetensors", verify=False)


def _without_layout(pack: Path) -> None:
    raw = json.loads((pack / "manifest.json").read_text())
    del raw["layout"]
    (pack / "manifest.json").write_text(json.dumps(raw))


def test_safetensors_of_a_pack_without_layout_take_the_templates_filtered_layout(tmp_path):
    pack = tmp_path / "p"
    write_pack(pack, _model(1), "s", state_dict_filter=NO_BIAS)
    _without_layout(pack)
    with pytest.raises(MissingLayoutError) as missing:
        to_safetensors(pack, tmp_path / "m.safetensors")
    assert missing.value.path == str(pack)
    to_safetensors(pack, tmp_path / "m.safetensors", like=_model(2))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert "0.bias" not in set(f.keys())
        assert torch.equal(f.get_tensor("0.weight"), _model(1)[0].weight.detach())
    wrong = torch.nn.Linear(4, 3)
    with pytest.raises(LayoutMismatchError) as info:
        to_safetensors(pack, tmp_path / "w.safetensors", like=wrong)
    assert info.value.path == str(pack)
    assert info.value.pack_layout_hash == read_manifest(pack).layout_hash
    assert info.value.model_layout_hash == layout_of(wrong, NO_BIAS).layout_hash


def test_from_safetensors_names_the_file_it_cannot_use(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CodecError, match="cannot read safetensors") as unreadable:
        from_safetensors(bad, tmp_path / "p")
    assert unreadable.value.path == str(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CodecError, match="no model_schema_hash") as schema:
        from_safetensors(tmp_path / "bare.safetensors", tmp_path / "p")
    assert schema.value.path == str(tmp_path / "bare.safetensors")


class _WithSteps(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(3, 2).to(torch.bfloat16)
        self.register_buffer("steps", torch.tensor([seed, 2 * seed], dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([seed % 2 == 0, True]))


def test_a_state_artifact_loads_back_every_tensor_in_its_dtype(tmp_path):
    source = _WithSteps(3)
    path = tmp_path / "model.safetensors"
    assert save_state_artifact({"model": source, "optimizer": "ignored"}, path) == 4
    target = _WithSteps(4)
    assert load_state_artifact(path, target) == 4
    for key, value in source.state_dict().items():
        got = target.state_dict()[key]
        assert got.dtype == value.dtype and torch.equal(got, value), key


def test_a_state_artifact_of_another_model_is_refused_untouched(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state_artifact(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5)), path)
    target = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    target[0].to(torch.float16)
    before = _state(target)
    with pytest.raises(ArtifactError) as info:
        load_state_artifact(path, target)
    assert info.value.path == str(path)
    assert info.value.missing == ["2.bias", "2.weight"]
    assert info.value.unexpected == ["1.bias", "1.weight"]
    assert info.value.mismatched == {
        "0.bias": "[2] F32 vs [4] float16",
        "0.weight": "[2, 3] F32 vs [4, 3] float16",
    }
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    (tmp_path / "junk").write_bytes(b"\x00" * 16)
    with pytest.raises(CodecError, match="cannot read artifact") as junk:
        load_state_artifact(tmp_path / "junk", target)
    assert junk.value.path == str(tmp_path / "junk") and type(junk.value) is CodecError


def test_the_package_names_what_it_lacks():
    with pytest.raises(AttributeError, match=r"module 'fleet\.codec' has no attribute 'nope'"):
        fleet.codec.nope  # noqa: B018


def test_a_state_artifact_differing_only_in_dtype_or_only_by_missing_names_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state_artifact(torch.nn.Sequential(torch.nn.Linear(3, 2)), path)
    half = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.float16)
    with pytest.raises(ArtifactError) as dtype:
        load_state_artifact(path, half)
    assert (dtype.value.missing, dtype.value.unexpected) == ([], [])
    assert sorted(dtype.value.mismatched) == ["0.bias", "0.weight"]
    bigger = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ArtifactError) as missing:
        load_state_artifact(path, bigger)
    assert missing.value.missing == ["1.bias", "1.weight"] and missing.value.unexpected == []
