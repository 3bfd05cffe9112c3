"""The cluster launcher config and the KubeRay manifest are checked the way their tools check them."""

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from jobs.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]


def _launcher_config():
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_the_launchers_own_validation():
    cfg = prepare_config(_launcher_config())   # what `ray up` does before validating
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_teacher"]["resources"] == {"teacher": 1} and types["gpu_train"]["resources"] == {"trainer": 1}
    for name in ("cpu_decode", "gpu_teacher", "gpu_train"):
        assert types[name]["min_workers"] < types[name]["max_workers"], name
    assert any("pip install" in c and "sodkd" in c for c in cfg["setup_commands"])


def test_a_broken_launcher_config_is_rejected():
    bad = _launcher_config()
    bad["available_node_types"]["gpu_teacher"]["max_wrkers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        validate_config(prepare_config(copy.deepcopy(bad)))


def test_kuberay_rayjob_runs_a_real_sodkd_job():
    doc = yaml.safe_load((REPO / "cluster" / "k8s" / "rayjob-label.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.cli"] and argv[3] in COMMANDS
    spec = doc["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu-teacher"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    text = (REPO / "cluster" / "k8s" / "rayjob-label.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text  # credentials come from a secret, never the manifest
