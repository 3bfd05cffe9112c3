"""Running the real ``sodkd`` CLI in a subprocess and reading its one-line error (tests of jobs/errors.py)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"^sodkd (\S+): error: (.*?)(?: \(traceback: (\S+)\))?$")


def sodkd(*argv: str, tmp: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "SODKD_ERROR_DIR": str(tmp / "errors"), "RAY_ADDRESS": "127.0.0.1:9",
            "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ": error: " in ln or "Traceback" in ln]


def one_error(out: subprocess.CompletedProcess, command: str, logged: bool = True) -> tuple[str, Path | None]:
    """Exactly one error line, the last of stderr, no traceback; returns (message, log path). A config error
    is its own message (``logged=False``); any other failure's traceback is in a 0600 log file."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert out.stderr.rstrip("\n").splitlines()[-1] == lines[0]
    m = ERROR_LINE.match(lines[0])
    assert m and m.group(1) == command, lines[0]
    if not logged:
        assert m.group(3) is None, lines[0]
        return m.group(2), None
    log = Path(m.group(3))
    assert log.is_file() and stat.S_IMODE(log.stat().st_mode) == 0o600, log
    text = log.read_text()
    assert "Traceback (most recent call last)" in text
    return m.group(2), log
