"""fleet.testing as a user meets it: a test session of their own, with the pytest plugin
and their own TorchWorkload, run by pytest in a fresh directory (no fixture of ours);
and the conformance check failing a workload that breaks a re-run."""

from __future__ import annotations

import re

import pytest

from fleet.testing import ConformanceFailure, check_workload
from tests.harness import REPO

#: The user's project: a model, an optimizer and DataLoaders, and nothing else.
USER_WORKLOAD = """
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fleet.workloads import TorchWorkload


def data(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=gen)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def make(config):
    return TorchWorkload(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=config.get("lr", 1e-2)),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        train_data=lambda shards: DataLoader(data(1), batch_size=32, shuffle=True),
        eval_data=lambda split: DataLoader(data(2), batch_size=128),
        config=config,
    )
"""


def _docs_test() -> tuple[str, str]:
    """The conftest and the test of docs/own-model.md ("Testing your workload"), as a
    user copies them."""
    text = (REPO / "docs" / "own-model.md").read_text()
    found = re.search(r"```python\n(# conftest\.py\n.*?)```", text, re.S)
    assert found, "docs/own-model.md shows no conftest.py block"
    conftest, test = found.group(1).split("# test_train.py\n")
    return conftest, test


@pytest.mark.timeout(900)
def test_a_users_workload_test_passes_through_the_plugin(pytester):
    """A fresh directory holding only the user's workload (``mylab/train.py``) and the
    docs' conftest and ~10-line test: pytest (in a subprocess) starts the kit's Redis and
    two workers, the check runs a DiLoCo job and its re-runs, and the user's assertion
    holds."""
    conftest, test = _docs_test()
    (pytester.mkpydir("mylab") / "train.py").write_text(USER_WORKLOAD)
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_train=test)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-q", timeout=840)
    result.assert_outcomes(passed=1)


@pytest.mark.timeout(900)
def test_the_check_fails_a_workload_whose_re_run_differs(fleet_client):
    """A workload that draws its training data from os.urandom: its job completes and
    evaluates finitely, but a re-run of one of its rounds publishes another model, and
    the check says so."""
    with pytest.raises(ConformanceFailure, match="not a deterministic re-run"):
        check_workload(fleet_client, "tests.workloads.unseeded:make", inner_steps=4)


def test_the_check_passes_the_seeded_workload_and_reports_what_the_jobs_hold(
    fleet_client, fleet_settings
):
    """The same model with its data seeded passes; the report's losses, digest and pack
    are the job's own records, read back from Redis and the shared root, and its re-runs
    ran on both workers."""
    import torch

    from fleet.codec import read_pack
    from fleet.diloco import DiLoCoRun
    from fleet.jobs import JobStore

    report = check_workload(
        fleet_client, "tests.workloads.unseeded:make", {"seeded": True}, inner_steps=4
    )
    jobs = JobStore.from_settings(fleet_settings)
    job = jobs.get(report.job_id)
    assert job.status == "completed"
    run = DiLoCoRun.resume(fleet_client, report.job_id)
    assert [r.eval.loss for r in run.rounds() if r.eval] == report.eval_losses
    state = run.state()
    assert state is not None and state.global_digest == report.final_digest
    manifest, values = read_pack(fleet_client.shared.local_pack(job.artifacts["final_pack"]))
    assert manifest.values_digest == report.final_digest
    assert values.numel() == report.parameter_count == 8 * 2 + 2
    assert torch.isfinite(values).all()
    workers = {w.name for w in fleet_client.workers()}
    assert {w for w, _ in report.rerun_digests} == workers and len(workers) == 2
