"""`fleet diloco --config`, flags over the file, --print-config, --resume's rules, --json."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.jobs import JobStore
from fleet.local import worker_env
from tests.harness import DIGITS, REPO

TOML = f"""
workload = "{DIGITS}"
rounds = 7
inner_steps = 20
checkpoint_every = 2
max_wall_s = 600
eval_split = "Test"
[config]
lr = 0.02
[quorum]
min_replicas = 1
round_deadline_s = 30
[dataset]
path = "datasets/digits"
glob = "*.bin"
seed = 5
"""

YAML = f"""
workload: {DIGITS}
replicas: 3
outer: {{lr: 0.5, momentum: 0.8, nesterov: false}}
keep_checkpoints: 4
max_attempts: 5
"""


def _print(args: list[str], tmp_path=None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["diloco", *args, "--print-config"], terminal_width=300)
    return result.exit_code, result.output


@pytest.mark.parametrize("kind", ["toml", "yaml", "json"])
def test_a_config_file_sets_every_field_and_flags_override_it(kind, tmp_path):
    if kind == "toml":
        path, text = tmp_path / "run.toml", TOML
    elif kind == "yaml":
        path, text = tmp_path / "run.yaml", YAML
    else:
        path = tmp_path / "run.json"
        text = json.dumps({"workload": DIGITS, "quorum": {"min_replicas": 2}, "rounds": 4})
    path.write_text(text)
    code, out = _print(["--config", str(path), "--rounds", "9", "--config-json", '{"seed": 3}'])
    assert code == 0, out
    config = DiLoCoConfig.model_validate_json(out)
    assert config.rounds == 9, "the flag wins over the file"
    assert config.config["seed"] == 3
    if kind == "toml":
        assert config.config == {"lr": 0.02, "seed": 3}, "--config-json merges into [config]"
        assert (config.checkpoint_every, config.max_wall_s, config.eval_split) == (2, 600, "Test")
        assert config.quorum.round_deadline_s == 30 and config.dataset.glob == "*.bin"
        assert config.dataset.seed == 5
    if kind == "yaml":
        assert config.outer.name == "sgd" and config.outer.lr == 0.5
        assert (config.replicas, config.keep_checkpoints, config.max_attempts) == (3, 4, 5)


def test_flags_reach_nested_fields_and_defaults_come_from_the_model():
    code, out = _print(
        ["--workload", DIGITS, "--min-replicas", "1", "--round-deadline-s", "2.5",
         "--outer-optimizer", "sgd", "--dataset", "d", "--dataset-seed", "4",
         "--worker", "a", "--worker", "b",
         "--microshards-per-round", "6", "--any-step-count", "--keep-checkpoints", "3",
         "--pseudo-gradient", "int8", "--no-error-feedback", "--adaptive-deadline",
         "--deadline-k", "2.5"]
    )  # fmt: skip
    assert code == 0, out
    config = DiLoCoConfig.model_validate_json(out)
    assert config.quorum.min_replicas == 1 and config.quorum.round_deadline_s == 2.5
    assert config.outer.name == "sgd" and config.workers == ["a", "b"]
    assert config.dataset.seed == 4 and config.dataset.microshards_per_round == 6
    assert config.require_exact_steps is False and config.keep_checkpoints == 3
    assert config.pseudo_gradient.codec == "int8" and not config.pseudo_gradient.error_feedback
    adaptive = config.quorum.adaptive_deadline
    assert adaptive.enabled and adaptive.tight and adaptive.k == 2.5
    plain = DiLoCoConfig.model_validate_json(_print(["--workload", DIGITS])[1])
    assert plain == DiLoCoConfig(workload=DIGITS), "no flag: the model's defaults"
    assert plain.device == "auto"
    help_text = CliRunner().invoke(main, ["diloco", "--help"], terminal_width=200).output
    assert "[default: 50]" in help_text and "Config: quorum.min_replicas" in help_text
    assert "[default: auto]" in help_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'workload = "{DIGITS}"\nround = 3\n', "unknown key 'round'"),
        (f'workload = "{DIGITS}"\n[quorum]\nmin_replica = 1\n', "unknown key 'quorum.min_replica'"),
        (f'workload = "{DIGITS}"\nrounds = 0\n', "rounds: Input should be greater than or equal"),
        ("rounds = 2\n", "give --workload"),
        ('workload = "x:y"\nrounds = [1\n', "not valid TOML"),
        (f'workload = "{DIGITS}"\nreplicas = 1\n[quorum]\nmin_replicas = 2\n', "min_replicas 2 > "),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, out = _print(["--config", str(path)])
    assert code == 1 and expected in out, out
    assert out.strip().count("\n") == 0 and "Traceback" not in out and "RunConfigError" in out


def test_other_bad_inputs(tmp_path):
    (tmp_path / "run.ini").write_text("x")
    assert "unknown config file type '.ini'" in _print(["--config", str(tmp_path / "run.ini")])[1]
    assert "cannot read it" in _print(["--config", str(tmp_path / "none.toml")])[1]
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert "top level must be a table" in _print(["--config", str(tmp_path / "list.yaml")])[1]
    code, out = _print(["--workload", DIGITS, "--dataset-glob", "*.bin"])
    assert code == 1 and "--dataset-glob need a dataset" in out
    code, out = _print(["--workload", DIGITS, "--config-json", "[1]"])
    assert code == 1 and "--config-json: must be a JSON object" in out


def test_resume_refuses_flags_it_would_ignore_and_extends_with_rounds(fleet_settings, two_workers):
    """A job that failed after one of its 2 rounds: --resume with --replicas is refused
    (exit 2, naming the flag); --resume --rounds 3 runs rounds 1 and 2 and records 3."""
    from fleet.client import Fleet

    fleet = Fleet(fleet_settings)
    config = DiLoCoConfig(workload=DIGITS, rounds=2, inner_steps=3, replicas=2)

    def stop(record):
        raise RuntimeError("stopped by the test")

    run = DiLoCoRun.start(fleet, config, job_id=f"extend-{time.time_ns()}", on_round=stop)
    with pytest.raises(RuntimeError):
        run.run()
    jobs = JobStore(fleet.registry)
    assert jobs.get(run.job_id).status == "failed" and len(jobs.metrics(run.job_id)) == 1
    runner = CliRunner(env=worker_env(fleet_settings, [str(REPO)]))
    refused = runner.invoke(main, ["diloco", "--resume", run.job_id, "--replicas", "3"])
    assert refused.exit_code == 2 and "--replicas" in refused.output, refused.output
    shown = runner.invoke(
        main, ["diloco", "--resume", run.job_id, "--rounds", "3", "--print-config"]
    )
    assert json.loads(shown.output)["rounds"] == 3 and jobs.get(run.job_id).spec["rounds"] == 2
    shrink = runner.invoke(main, ["diloco", "--resume", run.job_id, "--rounds", "0"])
    assert shrink.exit_code == 1 and "has committed 1 rounds" in shrink.output
    extended = runner.invoke(main, ["diloco", "--resume", run.job_id, "--rounds", "3"])
    assert extended.exit_code == 0, extended.output
    assert [m["round"] for m in jobs.metrics(run.job_id)] == [0, 1, 2]
    assert jobs.get(run.job_id).spec["rounds"] == 3 and jobs.get(run.job_id).status == "completed"

    # --json everywhere a table is printed
    for args in (["jobs", "list", "--json"], ["jobs", "show", run.job_id, "--json"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert run.job_id in json.dumps(data)
    shown = json.loads(runner.invoke(main, ["jobs", "show", run.job_id, "--json"]).output)
    assert len(shown["metrics"]) == 3 and shown["status"] == "completed"
    table = runner.invoke(main, ["jobs", "show", run.job_id], terminal_width=250)
    assert "rounds" in table.output and "leases" in table.output and "{" not in table.output
    workers = json.loads(runner.invoke(main, ["workers", "--json"]).output)
    assert {w.name for w in two_workers} <= {w["name"] for w in workers}
    pack = jobs.get(run.job_id).artifacts["final_pack"]
    inspected = json.loads(runner.invoke(main, ["pack", "inspect", pack, "--json"]).output)
    assert inspected["format"].endswith("-v1") and inspected["parameter_count"] > 0
    fleet.close()


def test_dataset_inspect_json(tmp_path):
    runner = CliRunner(env={"FLEET_SHARED_ROOT": str(tmp_path)})
    assert (
        runner.invoke(main, ["dataset", "write", "digits", "d", "--microshards", "4"]).exit_code
        == 0
    )
    index = json.loads(runner.invoke(main, ["dataset", "inspect", "d", "--json"]).output)
    assert len(index["microshards"]) == 4 and index["view_id"] == "digits-4"


def test_a_bad_tracker_is_refused_before_anything_runs(fleet_settings, tmp_path):
    runner = CliRunner(env=worker_env(fleet_settings))
    for spec, expected in [
        ("comet:x", "unknown tracker 'comet:x'"),
        ("tensorboard", "give a place: tensorboard:DIR"),
    ]:
        result = runner.invoke(main, ["diloco", "--workload", DIGITS, "--tracker", spec])
        assert result.exit_code == 1 and "TrackerError" in result.output, result.output
        assert expected in result.output and "job " not in result.output


def test_a_failing_tracker_does_not_stop_the_run(fleet_settings, two_workers, tmp_path):
    """A JSONL file that cannot be written (its directory is a file): the run warns once
    and completes, and the other tracker gets every round."""
    (tmp_path / "blocked").write_text("a file, not a directory")
    runner = CliRunner(env=worker_env(fleet_settings, [str(REPO)]))
    args = ["diloco", "--workload", DIGITS, "--rounds", "2", "--inner-steps", "3"]
    args += ["--tracker", f"jsonl:{tmp_path / 'ok.jsonl'}"]
    args += ["--tracker", f"jsonl:{tmp_path / 'blocked' / 'x' / 'rounds.jsonl'}"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("JsonlTracker failed") == 1, result.output
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 2
