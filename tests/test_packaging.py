"""The wheel as a user installs it: a free distribution name, one top-level package,
extras for what only workers and demos need, and a core that runs without torch."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile

import pytest

from tests.harness import REPO

#: What the core install (no extra) must run without.
NOT_IN_CORE = ("torch", "numpy", "safetensors", "matplotlib", "sklearn", "prometheus_client")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), REPO],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [path] = out.glob("*.whl")
    return path


def test_the_wheel_has_one_top_level_package_under_a_free_name(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fleet"}, tops
    assert "fleet/examples/digits.py" in names and "fleet/lua/job_write.lua" in names
    assert meta["Name"] == "fleet-diloco" and wheel.name.startswith("fleet_diloco-")
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.split()[0].split(">")[0] in ("torch", "numpy", "safetensors")]
    torch_reqs = [r for r in requires if r.split(">")[0].split(";")[0].strip() == "torch"]
    assert any("extra == 'worker'" in r for r in torch_reqs), torch_reqs
    assert not [r for r in torch_reqs if "<" in r.split(";")[0]], "no cap on the user's torch"
    extras = set(meta.get_all("Provides-Extra"))
    assert {"worker", "demo", "monitoring", "tensorboard", "mlflow", "wandb", "hf", "all"} <= extras
    assert any(r.startswith("prometheus-client") for r in requires), "declared, not just imported"
    for extra in ("wandb", "all"):
        assert any(r.startswith("wandb>=0.17") and f"extra == '{extra}'" in r for r in requires)


def test_the_core_runs_without_torch_numpy_or_the_demo_libraries(tmp_path):
    """With those imports made impossible, the client, `fleet --help` and a
    `fleet diloco --print-config` from a config file still work."""
    (tmp_path / "run.toml").write_text('workload = "mylab.lm:make"\nrounds = 4\n')
    code = (
        "import sys\n"
        f"for name in {NOT_IN_CORE!r}:\n"
        "    sys.modules[name] = None\n"
        "import fleet.client, fleet.diloco, fleet.jobs, fleet.tracking\n"
        "from fleet.diloco import DiLoCoRun\n"
        "from fleet.cli import main\n"
        "main(sys.argv[1:], standalone_mode=False)\n"
    )
    for args in (["--help"], ["diloco", "--config", str(tmp_path / "run.toml"), "--print-config"]):
        out = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
            check=False, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
    assert '"rounds": 4' in out.stdout and '"device": "auto"' in out.stdout
