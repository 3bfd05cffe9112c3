"""One line per failure (issue 13, item 5): the real ``sodkd`` CLI in a subprocess, real files, real errors.

The line names the input and the log file that holds the traceback; ``--debug``/``-v`` print the traceback
instead; bad weights files and unwritable outputs fail in the driver's preflight, before Ray (the subprocesses
get ``RAY_ADDRESS`` of a port nothing listens on: a job that reached ``ray.init`` would fail differently).
S3 cases (credentials, deferred inputs) are in tests/integration/test_cli_s3_errors.py.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from cli_helpers import one_error, sodkd    # tests/cli_helpers.py (tests/ is on sys.path, as for conftest)
from cluster.preflight import PROBE_PREFIX
from jobs import errors
from models import create_model, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    save_weights(create_model("scfnet_m3"), d / "m3.pt")
    (d / "garbage.pt").write_bytes(b"\x80\x04 this is not a weights file" * 10)
    (d / "truncated.pt").write_bytes((d / "m3.pt").read_bytes()[:5000])
    return {"m3": d / "m3.pt", "garbage": d / "garbage.pt", "truncated": d / "truncated.pt"}


@pytest.fixture
def broken_input(tmp_path) -> Path:
    """A local input holding one broken link: a listing reject, nothing to label (no Ray needed)."""
    d = tmp_path / "input"
    d.mkdir()
    os.symlink(tmp_path / "nowhere.jpg", d / "gone.jpg")
    return d


def test_train_with_a_truncated_init_weights_file_fails_in_preflight_in_one_line(tmp_path, weights):
    out = sodkd("train", "--supervised", "--paired", str(tmp_path / "pairs"), "--storage", str(tmp_path / "runs"),
                "--name", "t", f"model.init_weights={weights['truncated']}", tmp=tmp_path)
    assert out.returncode == 2, out.stderr
    message, _ = one_error(out, "train", logged=False)      # a ConfigError: key, file and why
    assert message.startswith(f"model.init_weights: {weights['truncated']}: "), message
    assert "Ray" not in out.stderr
    assert not (tmp_path / "runs").exists()     # the storage probe left nothing behind


def test_debug_and_verbose_print_the_traceback_instead(tmp_path, weights):
    argv = ["train", "--supervised", "--paired", str(tmp_path / "p"), "--storage", str(tmp_path / "runs"),
            f"model.init_weights={weights['garbage']}"]
    for flag in ("--debug", "-v"):
        out = sodkd(flag, *argv, tmp=tmp_path)
        assert out.returncode == 1, out.stderr            # Python's own exit code for an uncaught exception
        assert "Traceback (most recent call last)" in out.stderr
        assert "model.init_weights" in out.stderr and "(traceback: " not in out.stderr
    assert not (tmp_path / "errors").exists() or not list((tmp_path / "errors").iterdir())


def test_distill_with_a_garbage_online_teacher_names_the_spec_before_ray(tmp_path, weights):
    spec = f"scfnet_m3:{weights['garbage']}"
    out = sodkd("distill", "--unlabeled", str(tmp_path / "u"), "--teacher", spec, "--storage",
                str(tmp_path / "runs"), "--name", "d", tmp=tmp_path)
    assert out.returncode == 2, out.stderr
    message, _ = one_error(out, "distill")
    assert message.startswith(f"teacher spec {spec}"), message


def test_label_with_a_missing_teacher_file_fails_before_listing_or_ray(tmp_path, broken_input):
    missing = tmp_path / "nope" / "r18.pt"
    out = sodkd("label", "--input", str(broken_input), "--output", str(tmp_path / "out"), "--teacher",
                f"scfnet_r18:{missing}", "tracking.enabled=false", tmp=tmp_path)
    assert out.returncode == 2, out.stderr
    message, _ = one_error(out, "label")
    assert str(missing) in message and "file not found" in message, message
    assert not (tmp_path / "out").exists()   # nothing written: the preflight probe was removed with its folder


def test_label_to_an_unwritable_output_names_it_and_exits_1(tmp_path, weights, broken_input):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out_uri = str(blocker / "out")    # below a regular file: no one can create it, root included
    out = sodkd("label", "--input", str(broken_input), "--output", out_uri, "--teacher", f"scfnet_m3:{weights['m3']}",
                "tracking.enabled=false", tmp=tmp_path)
    assert out.returncode == 1, out.stderr
    message, _ = one_error(out, "label")
    assert message.startswith(f"PreflightError: output {out_uri}: not writable"), message
    assert blocker.read_text() == "not a folder"


def test_a_pyarrow_filesystem_error_mid_job_is_one_line_naming_the_path(tmp_path, weights, broken_input):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "rejects").write_text("a file where the rejects folder goes")   # pyarrow cannot create the folder
    out = sodkd("label", "--input", str(broken_input), "--output", str(out_dir), "--teacher",
                f"scfnet_m3:{weights['m3']}", "tracking.enabled=false", tmp=tmp_path)
    assert out.returncode == 1, out.stderr
    message, _ = one_error(out, "label")
    assert re.match(r"^(FileExistsError|NotADirectoryError|OSError): .*" + re.escape(str(out_dir / "rejects")),
                    message), message
    assert not [p for p in out_dir.iterdir() if p.name.startswith(PROBE_PREFIX)]


def test_a_pyarrow_exception_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq
    bad = tmp_path / "part-0.parquet"
    bad.write_bytes(b"PAR1 and then nothing a parquet reader wants")
    try:
        with errors.naming(input=str(tmp_path / "in"), output=str(tmp_path)):
            pq.read_table(bad)
    except Exception as e:  # noqa: BLE001
        assert type(e).__module__.startswith("pyarrow") and isinstance(e, ValueError)
        code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 1 and err.count("\n") == 1        # a runtime failure, not the ValueError of a bad setting
    assert err.startswith(f"sodkd label: error: ArrowInvalid: Could not open Parquet input source '{bad}'"), err


# --- the report itself, on real exceptions (in process) ---------------------------------------------------

def _report(e: BaseException, capsys, tmp_path, monkeypatch, command="label") -> tuple[int | None, str]:
    monkeypatch.setenv("SODKD_ERROR_DIR", str(tmp_path / "errs"))
    try:
        raise e
    except BaseException as raised:  # a real traceback for the log
        code = errors.report(raised, command)
    return code, capsys.readouterr().err


def test_os_error_names_the_file_and_the_job_locations(tmp_path, capsys, monkeypatch):
    try:
        with errors.naming(input="/data/in", output="/data/out"):
            open(tmp_path / "missing-dir" / "x.bin", "rb")
    except OSError as e:
        code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 2 and err.count("\n") == 1       # FileNotFoundError: a usage error, as before
    assert f"FileNotFoundError: [Errno 2] No such file or directory: '{tmp_path}/missing-dir/x.bin'" in err
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    try:
        with errors.naming(input="/data/in", output="/data/out"):
            os.read(r, 1)
    except OSError as e:
        code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("sodkd label: error: OSError: [Errno 9] Bad file descriptor [input /data/in; output "
                          "/data/out] (traceback: ")


def test_a_message_without_a_location_gets_the_jobs_input_and_output(tmp_path, capsys, monkeypatch):
    try:
        with errors.naming(input="s3://bucket/in", output="/data/out"):
            raise TimeoutError("read timed out\nsecond line of detail")
    except OSError as e:
        code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 1 and err.count("\n") == 1
    assert "TimeoutError: read timed out | second line of detail [input s3://bucket/in; output /data/out]" in err


def test_ray_task_error_is_one_line_with_the_workers_error(tmp_path, capsys, monkeypatch):
    from ray.exceptions import RayTaskError
    try:
        raise ValueError("bad batch: id 3\nmore detail")
    except ValueError as cause:
        tb = "Traceback (most recent call last):\n  File \"worker.py\", line 1, in f\nValueError: bad batch: id 3"
        e = RayTaskError("map_batches(load_images)", tb, cause)
    code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("sodkd label: error: RayTaskError: map_batches(load_images) failed -> "
                          "ValueError: bad batch: id 3 (traceback: "), err
    e = e.as_instanceof_cause()      # what ray.get raises: RayTaskError(ValueError), text led by the proctitle
    assert isinstance(e, ValueError) and len(str(e).splitlines()) >= 3
    code, err = _report(e, capsys, tmp_path, monkeypatch)
    assert code == 1 and err.count("\n") == 1, err     # a Ray error first, not a ValueError (exit 2)
    assert err.startswith("sodkd label: error: RayTaskError(ValueError): a Ray task failed -> "
                          "ValueError: bad batch: id 3 (traceback: "), err
    log = Path(re.search(r"\(traceback: (\S+)\)", err).group(1))
    assert "The worker's error:" in log.read_text() and stat.S_IMODE(log.stat().st_mode) == 0o600


def test_ray_train_worker_group_error_names_the_rank_zero_failure(tmp_path, capsys, monkeypatch):
    from ray.train import WorkerGroupError
    e = WorkerGroupError("rank 0: RuntimeError: CUDA out of memory\n  File ...\n",
                         {1: KeyError("k"), 0: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")})
    code, err = _report(e, capsys, tmp_path, monkeypatch, command="train")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("sodkd train: error: WorkerGroupError: Training failed due to worker errors: -> "
                          "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")


def test_bugs_are_not_swallowed(tmp_path, capsys, monkeypatch):
    code, err = _report(KeyError("x"), capsys, tmp_path, monkeypatch)
    assert code is None and err == ""
    code, err = _report(ValueError("x"), capsys, tmp_path, monkeypatch)
    assert code == 2
    assert errors.report(OSError("x"), "label", debug=True) is None
