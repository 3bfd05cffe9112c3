"""``sodkd distill --task video``: flags and YAML resolve into a validated VideoTrainConfig (no Ray here)."""

from __future__ import annotations

import json

import pytest

from cluster.training.video import load_video_config
from jobs.cli import main
from kd.config import ConfigError


def _print_config(capsys, *argv: str) -> dict:
    assert main(["distill", "--task", "video", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flags_and_overrides_fill_the_video_config(capsys):
    cfg = _print_config(capsys, "--unlabeled", "frames", "--labels", "labels-out", "--name", "v1", "--storage",
                        "runs-x", "--val", "davis", "optim.epochs=2", "loss.change=0.5", "data.clip.length=4")
    assert cfg["mode"] == "distill-video" and cfg["model"]["name"] == "video_scfnet_m3"
    assert cfg["data"]["images"] == "frames" and cfg["data"]["labels"] == "labels-out"
    assert cfg["run"] == {**cfg["run"], "name": "v1", "storage": "runs-x"}
    assert cfg["val"]["uri"] == "davis" and cfg["optim"]["epochs"] == 2
    assert cfg["loss"]["change"] == 0.5 and cfg["data"]["clip"]["length"] == 4
    assert cfg["mlflow"]["experiment"] == "sodkd-video" and cfg["mlflow"]["onnx"] is False
    # the per-frame loss is the image job's kd section: dice + BCE from the YAML, every key overridable
    assert cfg["kd"]["structure"] == "dice" and cfg["kd"]["pixel"] == "bce" and cfg["kd"]["sharpen"] == 1.0
    sharp = _print_config(capsys, "--unlabeled", "f", "--labels", "l", "kd.sharpen=0.5", "kd.confidence=teacher")
    assert sharp["kd"]["sharpen"] == 0.5 and sharp["kd"]["confidence"] == "teacher"


def test_bad_video_configs_are_refused_by_key(capsys):
    base = ["distill", "--task", "video", "--unlabeled", "f", "--labels", "l", "--print-config"]
    assert main(base + ["model.name=scfnet_m3"]) == 2
    assert "not a video model" in capsys.readouterr().err
    assert main(base + ["loss.hint=0.5"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert main(base + ["loss.relation_mode=l3"]) == 2
    assert "relation_mode" in capsys.readouterr().err
    assert main(base + ["kd.pixl=bce"]) == 2
    assert "kd.pixl" in capsys.readouterr().err
    assert main(base + ["kd.sharpen=2"]) == 2
    assert "kd.sharpen" in capsys.readouterr().err
    assert main(["distill", "--task", "video", "--labels", "l", "--print-config"]) == 2
    assert "data.images" in capsys.readouterr().err
    assert main(["train-teacher", "--task", "video", "--print-config"]) == 2
    assert "only for `sodkd distill`" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optim.batch_size"):
        load_video_config({"data": {"labels": "l", "images": "i"}, "optim": {"batch_size": 3},
                           "scaling": {"num_workers": 2}})


def test_teacher_spec_or_path_gives_the_teacher_weights(capsys):
    cfg = _print_config(capsys, "--unlabeled", "f", "--labels", "l", "--teacher", "scfnet_r50:w/r50.pt",
                        "loss.hint=0.1")
    assert cfg["teacher"] == "w/r50.pt" and cfg["loss"]["hint"] == 0.1


def test_partial_sections_keep_the_video_defaults():
    cfg = load_video_config({"data": {"labels": "l", "images": "i"}, "optim": {"epochs": 3},
                             "mlflow": {"uri": "sqlite:///x.db"}, "scaling": {"torch_threads": 1}})
    assert cfg.optim.epochs == 3 and cfg.optim.batch_size == 4 and cfg.optim.lr == 0.01
    assert cfg.mlflow.experiment == "sodkd-video" and cfg.mlflow.onnx is False and cfg.mlflow.uri == "sqlite:///x.db"
    assert cfg.scaling.num_workers == 0 and cfg.scaling.torch_threads == 1
    assert cfg.model.name == "video_scfnet_m3" and cfg.run.name == "kdvideo-video_scfnet_m3"
    # the dict that crosses into Ray rebuilds the same config
    from kd.config import to_dict
    assert load_video_config(to_dict(cfg)) == cfg


def test_a_calibrated_image_file_starts_the_video_student_as_trained(tmp_path):
    """``sodkd calibrate`` folds a scale into the image student's finest head; the video student starts from the
    image student as trained (scale undone), like the image trainer's init."""
    import torch

    from cluster.training.video import build_student
    from models import create_model, save_weights
    from models.fuse import scale_output
    image = create_model("scfnet_m3").eval()
    before = image.heads[0].weight.detach().clone()
    save_weights(scale_output(image, 3.0), tmp_path / "cal.pt", extra_meta={"output_scale": 3.0})
    video = build_student(load_video_config({"data": {"labels": "/l", "images": "/i"},
                                             "model": {"init_weights": str(tmp_path / "cal.pt")}}))
    torch.testing.assert_close(video.heads[0].weight, before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(video.heads[1].weight, image.heads[1].weight)
