import subprocess
import sys

import numpy as np
import pytest
import torch

from cluster.export import read_export_metadata
from cluster.teachers import build_teacher
from jobs.export_cmd import export_with_parity
from models import create_model, save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("scfnet_m3").eval()
    path = tmp_path_factory.mktemp("w") / "m3.pt"
    save_weights(model, path)
    return path


# The dynamo ONNX exporter (the default) runs in `make demo` (the trained student is logged with it); the faster
# tracer-based one (it writes ONNX too) keeps the unit suite quick.
@pytest.mark.parametrize("fmt, suffix", [("pt2", ".pt2"), ("onnx", ".onnx")])
def test_export_writes_a_self_describing_file_with_parity(tmp_path, weights, shared_data, fmt, suffix):
    out = tmp_path / f"m3{suffix}"
    rep = export_with_parity(f"scfnet_m3:{weights}", out, fmt, size=96,
                             images=shared_data / "ecssd" / "images", onnx_exporter="torchscript")
    assert rep["max_abs_diff"] <= 1e-4 and rep["input_size"] == 96 and out.stat().st_size > 100_000
    meta = read_export_metadata(str(out))
    assert meta["model"] == "scfnet_m3" and meta["input_size"] == 96 and len(meta["mean"]) == 3
    assert meta["dynamic_hw"] and meta["bn_folded"]
    t = build_teacher(str(out), device="cpu")
    probs = t.predict(np.zeros((3, 96, 96, 3), np.uint8))
    assert probs.shape == (3, 96, 96) and 0 <= probs.min() and probs.max() <= 1


def test_export_rejects_mismatched_spec_torchscript_and_exported_input(tmp_path, weights):
    with pytest.raises(ValueError, match="holds scfnet_m3, not scfnet_r18"):
        export_with_parity(f"scfnet_r18:{weights}", tmp_path / "x.onnx", "onnx", size=64)
    with pytest.raises(ValueError, match="no longer writes TorchScript"):
        export_with_parity(f"scfnet_m3:{weights}", tmp_path / "x.ts", None, size=64)
    assert not (tmp_path / "x.ts").exists()
    res = subprocess.run([sys.executable, "-m", "jobs.cli", "export", "--model", str(tmp_path / "nope.onnx"),
                          "--output", str(tmp_path / "y.onnx")], capture_output=True, text=True)
    assert res.returncode == 2 and "already exported" in res.stderr


def test_fixed_size_export_pins_height_and_width_and_keeps_the_maps(tmp_path, weights):
    import onnx
    import onnxruntime as ort

    from cluster.export import export_teacher
    from models import load_weights
    model = load_weights(weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = {}
    for fixed in (False, True):
        path = tmp_path / f"m3-{fixed}.onnx"
        meta = export_teacher(model, path, "onnx", input_size=64, onnx_exporter="torchscript", fixed_size=fixed)
        assert meta["dynamic_hw"] is (not fixed) and read_export_metadata(str(path))["dynamic_hw"] is (not fixed)
        dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value or d.dim_param for d in dims][2:] == ([64, 64] if fixed else ["height", "width"])
        assert dims[0].dim_param                                  # the batch stays free either way
        out[fixed] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)
