"""The golden pack vectors of tests/data/pack-v1 (vendored, used as they are)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fleet.codec import from_safetensors, load_pack_into, pack_plan, read_pack

CASES = ["basic", "filtered"]


def _case(conformance_dir: Path, case: str) -> tuple[Path, dict | None, dict]:
    d = conformance_dir / case
    if (d / "filter.json").exists():
        spec = json.loads((d / "filter.json").read_text())
        return d, spec["state_dict_filter"], spec["expected_plan"]
    return d, None, json.loads((d / "plan.json").read_text())["expected_plan"]


def _reference_model() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    model[2].to(torch.bfloat16)
    return model


@pytest.mark.parametrize("case", CASES)
def test_writing_the_state_dict_gives_identical_bytes(conformance_dir, case, tmp_path):
    d, sdf, _ = _case(conformance_dir, case)
    manifest = from_safetensors(
        d / "state_dict.safetensors", tmp_path / "pack", "schema-basic-v1", state_dict_filter=sdf
    )
    golden = json.loads((d / "pack" / "manifest.json").read_text())
    assert (tmp_path / "pack" / "values.f32le").read_bytes() == (
        d / "pack" / "values.f32le"
    ).read_bytes()
    for key in (
        "format",
        "model_schema_hash",
        "layout_hash",
        "parameter_count",
        "values_f32_le",
        "included_keys",
        "excluded_float_keys",
        "ignored_non_float_keys",
        "state_dict_filter",
    ):
        assert manifest.to_json()[key] == golden[key], key


@pytest.mark.parametrize("case", CASES)
def test_plan_matches(conformance_dir, case):
    d, sdf, expected = _case(conformance_dir, case)
    assert pack_plan(load_file(d / "state_dict.safetensors"), sdf) == expected
    model = _reference_model()
    model.load_state_dict(load_file(d / "state_dict.safetensors"))
    assert pack_plan(model, sdf) == expected


@pytest.mark.parametrize("case", CASES)
def test_golden_pack_restores_exactly(conformance_dir, case):
    d, sdf, expected = _case(conformance_dir, case)
    source = load_file(d / "state_dict.safetensors")
    model = _reference_model()
    with torch.no_grad():
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.fill_(-7.0)
    load_pack_into(d / "pack", model, state_dict_filter=sdf, verify=True)
    restored = model.state_dict()
    for key, want in source.items():
        got = restored[key]
        if key in expected["included_keys"]:
            assert got.dtype == want.dtype, key
            assert torch.equal(got, want), key
        elif key in expected["excluded_float_keys"]:
            assert torch.all(got == -7.0), f"{key} is excluded and must be untouched"
    manifest, flat = read_pack(d / "pack")
    assert flat.dtype == torch.float32 and flat.shape == (expected["parameter_count"],)
    assert manifest.values_digest is None  # golden packs carry no fleet keys: still accepted


def test_filter_defaults_to_the_manifest_filter(conformance_dir):
    d, _, expected = _case(conformance_dir, "filtered")
    model = _reference_model()
    manifest = load_pack_into(d / "pack", model)  # no filter given: the pack's own
    assert manifest.layout_hash == expected["layout_hash"]
