"""The layer rule: models/ and kd/ import neither Ray nor MLflow, nor the layers above them.

Checked in a fresh interpreter, importing every submodule found by pkgutil, so an import hidden in any
file (not only the package __init__) is caught.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, json, pkgutil, sys
imported = []
for top in {packages!r}:
    pkg = importlib.import_module(top)
    imported.append(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
loaded_tops = sorted({{m.split(".")[0] for m in sys.modules}})
print(json.dumps({{"imported": imported, "tops": loaded_tops}}))
"""


def _probe(*packages: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(packages=list(packages))], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_models_and_kd_never_import_ray_or_mlflow():
    result = _probe("models", "kd")
    assert "models.scfnet" in result["imported"] and "models.weights" in result["imported"]
    assert any(m.startswith("kd.") for m in result["imported"])
    assert not {"ray", "mlflow"} & set(result["tops"]), result["tops"]
    assert not {"cluster", "jobs"} & set(result["tops"]), result["tops"]


def test_models_imports_nothing_else_of_sodkd():
    result = _probe("models")
    assert not {"kd", "cluster", "jobs", "ray", "mlflow"} & set(result["tops"]), result["tops"]


def test_cluster_never_imports_jobs():
    """models <- kd <- cluster <- jobs: the CLI layer checks what it hands down, nothing below reaches up."""
    result = _probe("cluster")
    assert "cluster.training.loop" in result["imported"] and "cluster.submit" in result["imported"]
    assert "jobs" not in set(result["tops"]), result["tops"]
    # imports inside functions (run only when called) are not seen by the probe: read the sources too
    assert imports_of(REPO / "cluster", {"jobs"}) == [], "cluster/ imports jobs"
    assert imports_of(REPO / "models", {"kd", "cluster", "jobs", "ray", "mlflow"}) == []
    assert imports_of(REPO / "kd", {"cluster", "jobs", "ray", "mlflow"}) == []


def imports_of(package: Path, tops: set[str]) -> list[str]:
    """``file:line module`` for every import statement under ``package`` of a module whose top is in ``tops``."""
    import ast
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in tops]
    return found


def test_source_scan_sees_a_function_level_import(tmp_path, monkeypatch):
    pkg = tmp_path / "cluster"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from jobs.cli import COMMANDS\n    return COMMANDS\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert imports_of(pkg, {"jobs"}) == ["cluster/x.py:2 jobs.cli"]
