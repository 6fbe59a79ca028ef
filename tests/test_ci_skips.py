"""Under CI=true a skipped multi-host, ENOSPC or browser test fails the run unless
FLEET_ALLOW_SKIPS names it (tests/conftest.py): checked by running pytest on stand-ins
that skip the way those tests do, with this suite's conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from tests.harness import REPO

#: Stand-ins, named and built like the tests they stand for: a module skipped as a whole
#: (test_multi_host.py), a fixture that skips (the tmpfs one), a test that needs a fixture
#: that skips (chromium), and an ordinary skip that must stay a skip.
STAND_INS = {
    "test_multi_host.py": """
import pytest
pytestmark = pytest.mark.skipif(True, reason="multi-host tests need root (ip netns)")
def test_two_hosts():
    pass
""",
    "test_faults.py": """
import pytest
@pytest.fixture
def tiny_shared_root():
    pytest.skip("cannot mount a tmpfs here")
def test_enospc(tiny_shared_root):
    pass
def test_other():
    pytest.skip("an ordinary skip")
""",
    "test_flower.py": """
import pytest
@pytest.fixture
def chromium():
    pytest.skip("chromium is not installed")
def test_tasks_page(chromium):
    pass
""",
}


def _run(tmp_path: Path, **env: str) -> tuple[int, dict[str, str], str]:
    """Run the stand-ins with this suite's conftest; ``(exit status, {test: passed,
    skipped, failed or error}, output)``."""
    root = tmp_path / "suite"
    (root / "tests").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tests" / "conftest.py", root / "tests" / "conftest.py")
    for name, text in STAND_INS.items():
        (root / "tests" / name).write_text(text)
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "FLEET_ALLOW_SKIPS")}
    environ["PYTHONPATH"] = str(REPO)
    report = root / "report.xml"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider",
         f"--junitxml={report}", "-q", "tests"],
        cwd=root, env=environ | env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = (
            kinds[0].replace("failure", "failed") if kinds else "passed"
        )
    return out.returncode, outcomes, out.stdout + out.stderr


ALL_SKIPPED = dict.fromkeys(
    ["test_two_hosts", "test_enospc", "test_other", "test_tasks_page"], "skipped"
)


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    code, outcomes, output = _run(tmp_path)
    assert (code, outcomes) == (0, ALL_SKIPPED), output
    assert _run(tmp_path, CI="false")[:2] == (0, ALL_SKIPPED)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_skipped_claim_fails_the_run(tmp_path, ci):
    code, outcomes, output = _run(tmp_path, CI=ci)
    # skipped at set-up (a module's skipif, a fixture that skips): pytest reports an error
    assert code == 1 and outcomes == {
        "test_two_hosts": "error",
        "test_enospc": "error",
        "test_tasks_page": "error",
        "test_other": "skipped",  # an ordinary skip stays a skip
    }, output
    for kind in ("multi-host", "enospc", "browser"):
        assert f"{kind} tests must run in CI" in output
    assert "cannot mount a tmpfs here" in output, "the skip's reason is kept"


def test_fleet_allow_skips_names_what_may_skip(tmp_path):
    code, outcomes, output = _run(
        tmp_path, CI="true", FLEET_ALLOW_SKIPS="multi-host, *test_faults.py::test_enospc"
    )
    assert code == 1 and outcomes == {**ALL_SKIPPED, "test_tasks_page": "error"}, output
    allowed = "multi-host,enospc,test_tasks_page"
    assert _run(tmp_path, CI="true", FLEET_ALLOW_SKIPS=allowed)[:2] == (0, ALL_SKIPPED)
