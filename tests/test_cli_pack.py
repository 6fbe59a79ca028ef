"""`fleet pack inspect|verify|convert`, through the real console script and click."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from fleet.cli import main
from fleet.codec import read_pack, write_pack


def _pack(tmp_path: Path) -> Path:
    write_pack(
        tmp_path / "p",
        torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)),
        "schema-cli",
    )
    return tmp_path / "p"


def test_inspect_shows_format_counts_hash_and_tensors(tmp_path):
    path = _pack(tmp_path)
    result = CliRunner().invoke(main, ["pack", "inspect", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    manifest, _ = read_pack(path)
    assert "burn-p2p-python-flattened-parameter-pack-v1" in result.output
    assert manifest.layout_hash in result.output
    assert "46 (184 bytes)" in result.output
    assert "0.weight" in result.output and "[4, 8]" in result.output


def test_verify_ok_and_corrupt(tmp_path):
    path = _pack(tmp_path)
    ok = CliRunner().invoke(main, ["pack", "verify", str(path)])
    assert ok.exit_code == 0 and "digest ok" in ok.output
    data = bytearray((path / "values.f32le").read_bytes())
    data[0] ^= 1
    (path / "values.f32le").write_bytes(bytes(data))
    bad = CliRunner().invoke(main, ["pack", "verify", str(path)], terminal_width=200)
    assert bad.exit_code == 1 and "DigestMismatchError" in bad.output


def test_verify_missing_pack_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(
        main, ["pack", "verify", str(tmp_path / "nope")], terminal_width=200
    )
    assert result.exit_code == 1 and "NotAPackError" in result.output
    assert "Traceback" not in result.output


def test_convert_both_ways(tmp_path):
    path = _pack(tmp_path)
    runner = CliRunner()
    assert (
        runner.invoke(
            main, ["pack", "convert", str(path), str(tmp_path / "m.safetensors")]
        ).exit_code
        == 0
    )
    back = runner.invoke(
        main,
        [
            "pack",
            "convert",
            str(tmp_path / "m.safetensors"),
            str(tmp_path / "q"),
            "--model-schema-hash",
            "schema-cli",
        ],
    )
    assert back.exit_code == 0, back.output
    assert (path / "values.f32le").read_bytes() == (tmp_path / "q" / "values.f32le").read_bytes()


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("fleet", path=str(Path(sys.executable).parent))
    assert exe, "the `fleet` console script is not installed"
    out = subprocess.run(
        [exe, "pack", "verify", str(_pack(tmp_path))], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
