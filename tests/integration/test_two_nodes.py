"""Teacher actors spread over the nodes of a (simulated) multi-node Ray cluster.

``ray.cluster_utils.Cluster`` starts a head and a worker node as separate raylets on this machine; each has
one CPU, and each teacher actor asks for 0.6, so a pool of two can only run with one actor per node.
"""

from __future__ import annotations

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from cluster.label import load_label_config, run_labelling
from cluster.labels import read_labels
from models import create_model, save_weights


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_teacher_pool_places_actors_on_both_nodes(two_nodes, shared_data, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    src = tmp_path / "images"
    src.mkdir()
    for p in sorted((shared_data / "ecssd" / "images").glob("*.jpg"))[:12]:
        (src / p.name).write_bytes(p.read_bytes())
    torch.manual_seed(0)
    save_weights(create_model("scfnet_m3"), tmp_path / "t.pt")
    cfg = load_label_config({
        "input": str(src), "output": str(tmp_path / "out"), "teachers": [f"scfnet_m3:{tmp_path / 't.pt'}"],
        "teacher_size": 64, "label_size": 64, "progress": False,
        "pool": {"size": 2, "num_cpus": 0.6, "batch_size": 2},
        "decode": {"num_cpus": 0.2, "batch_size": 2}, "write": {"num_cpus": 0.1, "shard_rows": 4},
        "tracking": {"enabled": False}})
    summary = run_labelling(cfg)
    assert summary.labelled == 12 and read_labels(str(tmp_path / "out")).num_rows == 12
    actors = [a for a in list_actors(detail=True, limit=1000) if "TeacherLabeler" in (a.class_name or "")]
    nodes = {a.node_id for a in actors}
    assert len(actors) >= 2 and len(nodes) == 2, [(a.class_name, a.node_id, a.state) for a in actors]
