"""Video distillation end to end on real DAVIS frames: the labelling job labels frame folders, the video trainer
assembles clips from its shards, distils the video student, lowers the loss, logs to MLflow and resumes (after a
resubmission, and after one of two workers was killed).

Real Ray (one private local instance, 2 CPUs), real label shards on disk, a real MLflow sqlite store in tmp_path.
The teacher is an ``scfnet_r18`` with random weights whose BatchNorm statistics come from the frames themselves,
so its maps follow the image content (no trained teacher is needed to check that the student learns to imitate
one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from cluster.label import load_label_config, run_labelling
from cluster.labels import read_labels
from cluster.video_data import ClipSet, FrameReader
from cluster.training.video import load_video_config, run_video_distill
from jobs.cli import main
from kd import schema as S
from kd.clips import ClipConfig
from kd.videoio import frame_key, write_video
from models import create_model, load_weights, save_weights

pytestmark = pytest.mark.integration

SEQUENCES = ("blackswan", "car-shadow")
FRAMES = 8
SIZE = 64


@pytest.fixture(scope="module")
def ray_local():
    """A private Ray (Ray Train's controller must find this cluster, not another on the machine), polling
    the workers every 0.5 s so that a killed worker's last checkpoint is registered soon after its report."""
    import ray

    from cluster.raylocal import start_private_ray
    with pytest.MonkeyPatch.context() as env:   # both variables are as they were after the module
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        env.delenv("RAY_API_SERVER_ADDRESS", raising=False)   # start_private_ray exports it
        start_private_ray(2, logging_level="ERROR", log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def davis(tmp_path_factory, shared_data):
    """The first frames (and masks) of two real DAVIS sequences, in the DAVIS layout."""
    root = tmp_path_factory.mktemp("davis")
    for seq in SEQUENCES:
        for kind, ext in (("images", "jpg"), ("masks", "png")):
            (root / seq / kind).mkdir(parents=True)
            for p in sorted((shared_data / "davis2016-dev" / seq / kind).glob(f"*.{ext}"))[:FRAMES]:
                shutil.copy(p, root / seq / kind / p.name)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, davis):
    torch.manual_seed(0)
    model = create_model("scfnet_r18")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    frames = [np.asarray(Image.open(p).convert("RGB").resize((96, 96))) for p in sorted(davis.glob("*/images/*.jpg"))]
    model.train()
    with torch.no_grad():
        model(torch.stack([model.normalize(f.transpose(2, 0, 1)) for f in frames]))
    path = tmp_path_factory.mktemp("teacher") / "r18.pt"
    save_weights(model.eval(), path)
    return path


@pytest.fixture(scope="module")
def labelled(ray_local, davis, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd-labels")
    db = tmp_path_factory.mktemp("mlflow-label") / "mlflow.db"
    cfg = load_label_config({
        "input": str(davis), "output": str(out), "teachers": [f"scfnet_r18:{teacher}"], "layout": "video",
        "label_size": 96, "teacher_size": 96, "progress": False,
        "pool": {"num_cpus": 0.5, "batch_size": 8, "torch_threads": 1}, "decode": {"num_cpus": 0.25},
        "tracking": {"uri": f"sqlite:///{db}"}})
    summary = run_labelling(cfg, samples=0)
    assert summary.labelled == len(SEQUENCES) * FRAMES
    return out


def test_label_shards_of_video_frames_carry_sequence_and_frame(labelled, davis):
    table = read_labels(str(labelled), columns=[S.KEY, S.SEQUENCE, S.FRAME])
    rows = sorted(zip(table.column(S.SEQUENCE).to_pylist(), table.column(S.FRAME).to_pylist(),
                      table.column(S.KEY).to_pylist()))
    assert [r[:2] for r in rows] == [(s, f) for s in SEQUENCES for f in range(FRAMES)]
    assert rows[3][2] == "blackswan/images/00003.jpg"
    clips = ClipSet.from_labels(str(labelled), str(davis), clip=ClipConfig(3, 2, 1), augment=None)
    assert len(clips) == 2 * 3 and clips.sequences() == list(SEQUENCES)
    only = ClipSet.from_labels(str(labelled), str(davis), clip=ClipConfig(3, 2, 1), augment=None,
                               sequences=["car-shadow"])
    assert len(only) == 3 and only.sequences() == ["car-shadow"]
    with pytest.raises(ValueError, match="dog"):
        ClipSet.from_labels(str(labelled), str(davis), sequences=["dog"])
    frames, labels = clips.sample(0, np.random.default_rng(0), SIZE)
    assert frames.shape == (3, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert labels.shape == (3, SIZE, SIZE) and 0.0 <= labels.min() and labels.max() <= 1.0
    assert labels.std() > 0.01     # the calibrated teacher's maps follow the image


def test_clip_augmentation_is_identical_across_frames(labelled, davis):
    from kd.augment import AugmentConfig, Augmenter
    from kd.imageio import resize

    cfg = AugmentConfig(crop_frac=0.3, hflip_p=0.5, vflip_p=0.5)
    plain = ClipSet.from_labels(str(labelled), str(davis), clip=ClipConfig(3, 2, 1), augment=None)
    aug = ClipSet.from_labels(str(labelled), str(davis), clip=ClipConfig(3, 2, 1), augment=cfg)
    frames, labels = aug.sample(1, np.random.default_rng(7), SIZE)
    # Every frame of the clip went through the same draw: one seed, taken from the clip's generator.
    seed = int(np.random.default_rng(7).integers(0, 2**63 - 1))
    for t, row in enumerate(plain.clips[1]):
        frame, label = plain._row(row)
        f, lab = Augmenter(cfg)(np.random.default_rng(seed), frame, label)
        np.testing.assert_array_equal(frames[t], resize(f, (SIZE, SIZE)))
    # ... and that draw is not the identity (the test would pass vacuously otherwise).
    p, _ = plain.sample(1, np.random.default_rng(0), SIZE)
    assert np.abs(frames.astype(int) - p.astype(int)).mean() > 5


def test_stills_are_unmoving_clips_mixed_into_every_step(labelled, davis, tmp_path):
    """Rehearsal: an image label job's rows (here the frames' own shards, read as images: key + label only)
    become clips of identical frames, and ``data.stills.per_step`` of them join every step's video clips."""
    from cluster.training.video import VideoTask
    from kd.augment import AugmentConfig
    from kd.config import ConfigError

    aug = AugmentConfig(crop_frac=0.3, hflip_p=0.5)
    stills = ClipSet.from_labels(str(labelled), str(davis), clip=ClipConfig(3, 2, 1), augment=aug, stills=True)
    assert len(stills) == len(SEQUENCES) * FRAMES
    frames, labels = stills.sample(5, np.random.default_rng(3), SIZE)
    assert frames.shape == (3, SIZE, SIZE, 3) and labels.std() > 0.01
    assert all(np.array_equal(frames[0], f) for f in frames) and all(np.array_equal(labels[0], m) for m in labels)

    base = {"data": {"labels": str(labelled), "images": str(davis), "size": SIZE,
                     "stills": {"labels": str(labelled), "images": str(davis), "per_step": 1}},
            "optim": {"epochs": 2, "batch_size": 2, "lr": 0.05, "warmup_epochs": 0.5},
            "run": {"name": "kdvideo-stills", "storage": str(tmp_path / "runs")},
            "mlflow": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "log_every": 1},
            "scaling": {"num_workers": 0, "torch_threads": 1}}
    task = VideoTask(base)
    task.open(0, 1, 3, None)
    batches = list(task.batches(0, 0, 1))
    assert [len(b) for b in batches] == [3, 3, 3]        # 2 video clips + 1 still per step
    for b in batches:
        still_frames = b[-1][0]
        assert all(np.array_equal(still_frames[0], f) for f in still_frames)
        assert not all(np.array_equal(b[0][0][0], f) for f in b[0][0])     # a video clip moves
    out = run_video_distill(load_video_config(base))
    assert len(out.history) == 2 and all(np.isfinite(h[S.TRAIN_LOSS]) for h in out.history)
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(out.mlflow_run_id)
    assert run.data.params["data.stills.per_step"] == "1"
    with pytest.raises(ConfigError, match="data.stills.labels and data.stills.images"):
        load_video_config({"data": {"labels": "/l", "images": "/i", "stills": {"per_step": 2}}})
    with pytest.raises(ConfigError, match="data.stills.per_step"):
        load_video_config({"data": {"labels": "/l", "images": "/i", "stills": {"per_step": -1}}})


def test_frozen_parts_keep_the_image_students_weights_and_statistics(labelled, davis, tmp_path):
    """``model.freeze``: the video student starts from an image student and only its new temporal and guidance
    parts learn; every frozen tensor, BatchNorm running statistics included, comes out as it went in."""
    image = create_model("scfnet_m3")
    with torch.no_grad():                   # statistics a frozen BatchNorm must keep (training would move them)
        for m in image.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    save_weights(image, tmp_path / "image.pt")
    frozen = ["backbone", "mapping", "context", "scfm*", "heads"]
    out = run_video_distill(load_video_config({
        "data": {"labels": str(labelled), "images": str(davis), "size": SIZE},
        "model": {"init_weights": str(tmp_path / "image.pt"), "freeze": frozen},
        "optim": {"epochs": 1, "batch_size": 2, "lr": 0.05, "warmup_epochs": 0.5},
        "run": {"name": "kdvideo-frozen", "storage": str(tmp_path / "runs")},
        "mlflow": {"enabled": False}, "output": {"fp16": False},
        "scaling": {"num_workers": 0, "torch_threads": 1}}))
    video = load_weights(out.weights[0]).state_dict()
    for name, value in image.state_dict().items():
        torch.testing.assert_close(video[name], value, msg=name)
    assert video["temporal.gamma"].abs().sum() > 0 and video["guide2.alpha"].abs().sum() > 0   # these learnt
    from kd.config import ConfigError
    with pytest.raises(ConfigError, match=r"model\.freeze: 'temporl' names no parameter .*temporal"):
        load_video_config({"data": {"labels": "/l", "images": "/i"}, "model": {"freeze": ["temporl"]}})


def test_a_part_with_its_own_learning_rate_moves_that_much(labelled, davis, tmp_path):
    """``model.lr_mult``: the decoder trains (unlike ``freeze``) but at a millionth of the rate of the new parts;
    the pattern reaches MLflow as a param although MLflow refuses ``*`` in a name."""
    image = create_model("scfnet_m3")
    save_weights(image, tmp_path / "image.pt")
    db = tmp_path / "mlflow.db"
    out = run_video_distill(load_video_config({
        "data": {"labels": str(labelled), "images": str(davis), "size": SIZE},
        "model": {"init_weights": str(tmp_path / "image.pt"), "freeze": ["backbone", "mapping", "context"],
                  "lr_mult": {"scfm*": 1e-6, "heads": 1e-6}},
        "optim": {"epochs": 1, "batch_size": 2, "lr": 0.05, "warmup_epochs": 0.5, "weight_decay": 0.0},
        "run": {"name": "kdvideo-lr-mult", "storage": str(tmp_path / "runs")},
        "mlflow": {"uri": f"sqlite:///{db}", "experiment": "lr-mult"}, "output": {"fp16": False},
        "scaling": {"num_workers": 0, "torch_threads": 1}}))
    video = load_weights(out.weights[0]).state_dict()
    slow = [n for n in image.state_dict() if n.startswith(("scfm", "heads")) and n.endswith("weight")]
    moved = max(float((video[n] - image.state_dict()[n]).abs().max()) for n in slow)
    assert 0 < moved < 1e-5, moved                   # trained, not frozen, and at the slow rate
    assert float(video["temporal.gamma"].abs().max()) > 1e-4     # the new parts at the full rate
    params = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(out.mlflow_run_id).data.params
    assert params["model.lr_mult.scfm_"] == "1e-06" and params["model.lr_mult.heads"] == "1e-06"


def test_frames_of_video_files_are_read_by_frame_key(tmp_path, davis):
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((davis / "blackswan" / "images").glob("*.jpg"))]
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "swan.mkv", frames, fps=24, codec="ffv1")
    shutil.copy(davis / "blackswan" / "images" / "00002.jpg", tmp_path / "clips" / "still.jpg")
    reader = FrameReader(str(tmp_path))
    np.testing.assert_array_equal(reader(frame_key("clips/swan.mkv", 5)), frames[5])
    np.testing.assert_array_equal(reader("clips/still.jpg"), frames[2])
    with pytest.raises(IndexError, match="frame 99"):
        reader(frame_key("clips/swan.mkv", 99))
    with pytest.raises(FileNotFoundError, match="missing"):
        reader("clips/none.jpg")


def test_labelling_job_labels_the_frames_of_video_files(ray_local, davis, teacher, tmp_path):
    """Video files go through the same labelling pipeline: one row per decoded frame, keyed ``<file>#<index>``."""
    from cluster.labels import read_rejects

    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((davis / "car-shadow" / "images").glob("*.jpg"))]
    src = tmp_path / "videos"
    src.mkdir()
    write_video(src / "car.mp4", frames[:6], fps=24)
    (src / "broken.mp4").write_bytes(b"not a video at all" * 20)
    out = tmp_path / "video-labels"
    cfg = load_label_config({
        "input": str(src), "output": str(out), "teachers": [f"scfnet_r18:{teacher}"], "layout": "video",
        "label_size": 64, "teacher_size": 64, "progress": False,
        "pool": {"num_cpus": 0.5, "batch_size": 8, "torch_threads": 1}, "decode": {"num_cpus": 0.25},
        "tracking": {"enabled": False}})
    summary = run_labelling(cfg, samples=0)
    assert (summary.labelled, summary.rejected) == (6, 1)
    table = read_labels(str(out), columns=[S.KEY, S.SEQUENCE, S.FRAME, S.ORIG_H, S.ORIG_W])
    rows = sorted(zip(table.column(S.FRAME).to_pylist(), table.column(S.KEY).to_pylist(),
                      table.column(S.SEQUENCE).to_pylist()))
    assert rows == [(i, frame_key("car.mp4", i), "car") for i in range(6)]
    assert set(table.column(S.ORIG_H).to_pylist()) == {270} and set(table.column(S.ORIG_W).to_pylist()) == {480}
    rejects = read_rejects(str(out))
    assert rejects.column(S.KEY).to_pylist() == ["broken.mp4"]
    # The trainer's clips come straight from these shards, frames decoded from the video file.
    clips = ClipSet.from_labels(str(out), str(src), clip=ClipConfig(3, 3, 1), augment=None)
    frame_of = clips.table.column(S.FRAME).to_pylist()
    assert sorted([frame_of[r] for r in c] for c in clips.clips) == [[0, 1, 2], [3, 4, 5]]
    f, lab = clips.sample(1, np.random.default_rng(0), SIZE)
    assert f.shape == (3, SIZE, SIZE, 3) and lab.shape == (3, SIZE, SIZE)
    # A rerun labels nothing new (ids of video frames are stable).
    assert run_labelling(cfg, samples=0).labelled == 0


def test_distillation_lowers_the_loss_logs_to_mlflow_and_resumes(labelled, davis, tmp_path):
    db = tmp_path / "mlflow.db"
    base = {
        "data": {"labels": str(labelled), "images": str(davis), "size": SIZE},
        "optim": {"epochs": 8, "batch_size": 2, "lr": 0.05, "warmup_epochs": 0.5},
        "run": {"name": "kdvideo-test", "storage": str(tmp_path / "runs")},
        "mlflow": {"uri": f"sqlite:///{db}", "log_every": 1},
        "val": {"uri": str(davis), "max_frames": 4, "size": SIZE, "every": 4},
        "scaling": {"num_workers": 0, "torch_threads": 1},
    }
    out = run_video_distill(load_video_config(base))
    losses = [h[S.TRAIN_LOSS] for h in out.history]
    assert len(losses) == 8 and out.steps_per_epoch == 3 and out.clips == 6
    assert np.mean(losses[-2:]) < 0.85 * np.mean(losses[:2]), losses
    assert {"train/spatial", "train/change", "train/relation"} <= set(out.history[-1])
    assert out.validation is not None and set(out.validation["sequences"]) == set(SEQUENCES)
    assert out.history[3]["val/mae"] >= 0 and "val/flicker" in out.history[-1]

    # The final weights are a streaming video student.
    student = load_weights(out.weights[0])
    assert student.name == "video_scfnet_m3" and hasattr(student, "streamer")

    # MLflow: params (the flat config), per-step and per-epoch losses, validation, per-sequence figures.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.change"] == "1.0" and run.data.params["data.clip.length"] == "3"
    steps = client.get_metric_history(out.mlflow_run_id, S.TRAIN_LOSS)
    assert len(steps) == 24
    assert {"train/change", "train/relation", "val/mae", "val/flicker", "data/clips",
            "val_seq/blackswan/sm"} <= set(run.data.metrics)
    assert "sequences.json" in [a.path.split("/")[-1] for a in client.list_artifacts(out.mlflow_run_id, "validation")]

    # Resubmitting with more epochs resumes from the checkpoint and continues the same MLflow run.
    more = dict(base, optim={**base["optim"], "epochs": 9})
    again = run_video_distill(load_video_config(more))
    assert again.resumed_from == [8] and again.mlflow_run_id == out.mlflow_run_id
    assert len(again.history) == 9
    assert len(client.get_metric_history(out.mlflow_run_id, S.TRAIN_LOSS)) == 27


def test_two_workers_one_killed_resume_from_the_checkpoint_and_finish(labelled, davis, tmp_path):
    """Two DDP workers (gloo) on 6 clips, 3 steps an epoch; rank 1 exits at step 4 (epoch 2) once, after the
    epoch-1 checkpoint was reported; FailureConfig restarts the group, both workers restore that checkpoint
    (each from its own copy) and the run finishes epoch 2 from step 3, in the same history."""
    marker = tmp_path / "failed-once"
    cfg = load_video_config({
        "data": {"labels": str(labelled), "images": str(davis), "size": SIZE, "cache": False},
        "optim": {"epochs": 2, "batch_size": 2},
        "run": {"name": "kdvideo-killed", "storage": str(tmp_path / "runs"), "max_failures": 1},
        "mlflow": {"enabled": False},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
        "debug": {"fail_at_step": 4, "fail_marker": str(marker), "fail_rank": 1, "fail_after_s": 2.0},
    })
    out = run_video_distill(cfg)
    assert marker.read_text().startswith("worker rank 1 exited at step 4")
    assert out.steps_per_epoch == 3 and out.resumed_from == [1]
    assert (out.metrics["epoch"], out.metrics["step"]) == (2, 6)
    assert [h["epoch"] for h in out.history] == [1, 2] and all(np.isfinite(h[S.TRAIN_LOSS]) for h in out.history)
    ckpt = json.loads((Path(out.checkpoint) / "meta.json").read_text())
    assert ckpt["resumed_from"] == [1] and ckpt["step"] == 6
    student = load_weights(out.weights[0])
    assert student.name == "video_scfnet_m3" and all(torch.isfinite(p).all() for p in student.parameters())


def test_cli_distill_video_and_eval_video(labelled, davis, tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    rc = main(["distill", "--task", "video", "--unlabeled", str(davis), "--labels", str(labelled),
               "--name", "cli-video", "--storage", str(tmp_path / "runs"), "optim.epochs=1", "optim.batch_size=2",
               f"data.size={SIZE}", f"mlflow.uri=sqlite:///{db}", "mlflow.log_every=1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "6 clips from 16 frames" in text and "epoch 1:" in text
    weights = tmp_path / "runs" / "cli-video" / "final" / "cli-video.pt"
    assert weights.is_file()
    report = tmp_path / "eval.json"
    assert main(["eval-video", "--weights", str(weights), "--data", str(davis), "--size", str(SIZE),
                 "--max-frames", "4", "--json", str(report)]) == 0
    res = json.loads(report.read_text())[str(weights)]
    assert res["overall"]["frames"] == 8 and set(res["sequences"]) == set(SEQUENCES)
