import pytest

from cluster import submit
from jobs.submit_cmd import check_job


def test_runtime_env_passes_names_not_printed_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MY_FLAG", "on")
    env = submit.build_runtime_env(["MY_FLAG"])
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"  # travels to the job...
    assert env["env_vars"]["MY_FLAG"] == "on"
    shown = submit.describe_runtime_env(env)
    assert "very-secret-value" not in shown and "AWS_SECRET_ACCESS_KEY=<set>" in shown  # ...but is never shown
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in shown
    assert ".venv" in env["excludes"] and (submit.REPO_ROOT / "jobs" / "cli.py").is_file()


def test_missing_env_name_and_unknown_job_are_errors(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        submit.build_runtime_env(["NOT_SET_ANYWHERE"])
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="frobnicate: not a sodkd job"):
        check_job(["frobnicate"])
    with pytest.raises(ValueError, match="submit: not a sodkd job"):
        check_job(["submit", "models"])
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        submit.resolve_address(None)
