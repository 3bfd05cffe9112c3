import pytest

from cluster import submit
from jobs.submit_cmd import check_job


def test_runtime_env_passes_names_and_never_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "very-secret-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "very-secret-token")
    monkeypatch.setenv("AWS_PROFILE", "team")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MY_FLAG", "on")
    env = submit.build_runtime_env(["MY_FLAG"])
    # A runtime env is job metadata (ray job list, job info, runtime_env_agent.log): no credential goes in it.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env["env_vars"])
    assert "very-secret" not in repr(env)
    assert env["env_vars"]["MY_FLAG"] == "on" and env["env_vars"]["AWS_PROFILE"] == "team"  # a profile NAME
    assert submit.secrets_not_forwarded() == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    shown = submit.describe_runtime_env(env)
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in shown and "MY_FLAG=on" in shown
    assert ".venv" in env["excludes"] and (submit.REPO_ROOT / "jobs" / "cli.py").is_file()


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                                  "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY",
                                  "DB_SECRET", "RAY_AUTH_TOKEN"])
def test_a_secret_looking_name_is_refused_in_one_line(monkeypatch, name):
    monkeypatch.setenv(name, "canary-value")
    with pytest.raises(ValueError) as e:
        submit.build_runtime_env([name])
    msg = str(e.value)
    assert name in msg and "canary-value" not in msg and "\n" not in msg
    assert "instance profile" in msg and "Kubernetes Secret" in msg   # says what to do instead


def test_names_that_only_resemble_secrets_pass(monkeypatch):
    for name in ("TOKENIZERS_PARALLELISM", "SODKD_KEY_FRAMES", "AWS_SHARED_CREDENTIALS_FILE", "OMP_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
        assert submit.build_runtime_env([name])["env_vars"][name] == "1"


def test_a_url_with_a_password_is_refused_and_never_shown(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:hunter2@mlflow.example:5000")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI: its URL carries a password") as e:
        submit.build_runtime_env()
    assert "hunter2" not in str(e.value)
    # describe_runtime_env never prints a secret, even for a runtime env built elsewhere
    shown = submit.describe_runtime_env({"env_vars": {"MLFLOW_TRACKING_URI": "https://bob:hunter2@m:5000",
                                                      "HF_TOKEN": "hf_canary", "A": "b"}})
    assert "hunter2" not in shown and "hf_canary" not in shown
    assert "HF_TOKEN=<set>" in shown and "https://bob:***@m:5000" in shown and "A=b" in shown


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
