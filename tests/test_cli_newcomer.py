"""The CLI as a newcomer meets it: no live worker, failed jobs, printed paths, the commands
of the README and the docs."""

from __future__ import annotations

import re
import shlex
import time
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.local import RedisServer
from tests.harness import DIGITS, REPO


@pytest.fixture(scope="module")
def empty_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("empty-redis"))
    yield server
    server.stop()


def test_diloco_without_a_live_worker_says_so_at_once(empty_redis):
    runner = CliRunner(env={"FLEET_REDIS_URL": empty_redis.url})

    def timed(*flags: str) -> tuple[float, str, int]:
        started = time.monotonic()
        result = runner.invoke(main, ["diloco", "--workload", DIGITS, *flags], terminal_width=300)
        return time.monotonic() - started, result.output, result.exit_code

    at_once, output, code = timed()
    assert code == 1, output
    assert "NoWorkersError" in output and "fleet worker" in output
    assert "after waiting" not in output
    waited_s, waited, code = timed("--wait-for-workers-s", "2")
    assert code == 1 and "after waiting 2 s" in waited
    # at once: sooner than the same command told to wait 2 s (which did wait them)
    assert waited_s >= 2.0 and at_once < waited_s


def test_a_failed_job_exits_non_zero(fleet_settings, two_workers):
    from fleet.local import worker_env

    runner = CliRunner(env=worker_env(fleet_settings, [str(REPO)]))
    args = ["diloco", "--workload", DIGITS, "--config-json", '{"fail_in": "train_window"}']
    result = runner.invoke(main, [*args, "--rounds", "1", "--inner-steps", "2"])
    assert result.exit_code == 1, result.output
    assert "RoundFailed" in result.output and "injected failure" in result.output


def test_a_cancelled_job_exits_3_and_jobs_cancel_exits_0(fleet_settings, two_workers):
    """README: `fleet diloco` exits 3 when its job was cancelled; `fleet jobs cancel`
    exits 0 (also for a job already ended, which it leaves as it was), 1 for no such job."""
    import subprocess
    import sys

    from fleet.jobs import JobStore
    from fleet.local import worker_env
    from tests.harness import inner_loops_started, wait_until

    env = worker_env(fleet_settings, [str(REPO)])
    job_id = f"cancel-exit-{time.time_ns()}"

    def fleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fleet", *args], env=env, cwd=REPO, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip

    run = subprocess.Popen(
        [sys.executable, "-m", "fleet", "diloco", "--workload", DIGITS, "--job-id", job_id,
         "--config-json", '{"step_sleep_s": 0.05}', "--replicas", "2", "--rounds", "50",
         "--inner-steps", "100", "--eval-every", "0"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        store = JobStore.from_settings(fleet_settings)
        wait_until(lambda: inner_loops_started(store, job_id) >= 1, 120, "the first inner loop")
        cancelled = fleet_cli("jobs", "cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert f"job {job_id} cancelled" in cancelled.stdout
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 3, out + err
    assert f"job {job_id} cancelled" in out
    assert store.get(job_id).status == "cancelled"
    again = fleet_cli("jobs", "cancel", job_id)
    assert again.returncode == 0 and f"job {job_id} cancelled" in again.stdout
    missing = fleet_cli("jobs", "cancel", f"{job_id}-nope")
    assert missing.returncode == 1 and "JobNotFound" in missing.stdout + missing.stderr


def test_pack_commands_take_paths_relative_to_the_shared_root(
    fleet_settings, fleet, two_workers, tmp_path, monkeypatch
):
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    fleet.export_parameter_pack(handle, "runs/printed/round-0001/global", "digits-mlp-v1")
    monkeypatch.chdir(tmp_path)  # not where the shared root is
    runner = CliRunner(env={"FLEET_SHARED_ROOT": str(fleet_settings.shared_root)})
    for command in ("inspect", "verify"):
        result = runner.invoke(main, ["pack", command, "runs/printed/round-0001/global"])
        assert result.exit_code == 0, result.output
    fleet.release_model(handle)


#: The pages a user reads commands from: the README, the docs site's pages (docs/, the
#: API reference included) and ops/README.md, which the site's Operations page includes.
DOC_PAGES = (
    REPO / "README.md",
    *sorted((REPO / "docs").rglob("*.md")),
    REPO / "ops" / "README.md",
)


def _doc_commands(page: Path) -> list[list[str]]:
    """``fleet ...`` lines of a page's bash blocks, as argument lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        block = block.replace("\\\n", " ")  # continuation lines
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("fleet "):
                commands.append(shlex.split(line)[1:])
    return commands


def _readme_commands() -> list[tuple[str, list[str]]]:
    """``(page, args)`` for every ``fleet ...`` line of :data:`DOC_PAGES`."""
    return [
        (str(page.relative_to(REPO)), args) for page in DOC_PAGES for args in _doc_commands(page)
    ]


def parse_cli(args: list[str]) -> click.Command:
    """Parse ``fleet <args>`` with the real command tree (nested groups too) without
    running it; the command reached. A wrong command or flag raises click.UsageError."""
    ctx = main.make_context("fleet", list(args))
    command: click.Command = main
    with warnings.catch_warnings():  # click 8.2 deprecates protected_args, still needed here
        warnings.simplefilter("ignore", DeprecationWarning)
        while isinstance(command, click.Group):
            name, sub, rest = command.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
            assert sub is not None, name
            ctx = sub.make_context(str(name), rest, parent=ctx)
            command = sub
    return command


@pytest.mark.parametrize(
    ("page", "args"),
    [
        pytest.param(page, args, id=f"{page}: {' '.join(args)[:60]}")
        for page, args in _readme_commands()
    ],
)
def test_every_fleet_command_in_the_readme_and_docs_parses(page, args):
    """Each `fleet ...` line of the README and the docs names real commands and options."""
    assert parse_cli(args) is not main, page


def test_the_readme_check_catches_a_wrong_flag():
    with pytest.raises(click.UsageError):
        parse_cli(["jobs", "logs", "JOB", "--folow"])
    pages = {page for page, _ in _readme_commands()}
    assert {"README.md", "docs/many-machines.md", "docs/operations.md"} <= pages, pages
    assert len(_doc_commands(REPO / "README.md")) >= 3
    assert len(_readme_commands()) >= 20


def test_the_readme_links_to_pages_that_exist():
    """The README is the way into the docs site (mkdocs build --strict checks the site's
    own links; the README is not one of its pages)."""
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    assert "docs/diloco.md" in links and len(links) >= 15, links
    assert [link for link in links if not (REPO / link).is_file()] == []


def test_the_scripts_say_how_to_get_fleet_on_the_path():
    assert "source .venv/bin/activate" in (REPO / "scripts" / "_setup.sh").read_text()
    for script in ("demo", "test"):
        assert "fleet_next_steps" in (REPO / "scripts" / script).read_text()
