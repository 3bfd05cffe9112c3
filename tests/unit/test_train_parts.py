"""The training core's pure parts: the LR schedule (closed-form values), parameter groups and the rates they
get, the mixed hard/soft batch loss, the picture panel, TrainConfig validation, steps per epoch and the
job CLI's config resolution. No Ray is started here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.training.launch import steps_per_epoch
from cluster.training.sections import ModelConfig, TrainConfig, freeze_parts, load_train_config, part_lr_groups
from jobs import cli
from kd.config import ConfigError
from kd.losses import kd_dice_loss, teacher_loss
from kd.schedule import WarmupCosine, set_lr, with_lr_mult
from kd.step import (KDLoss, MaskLoss, batch_loss, confidence_weights, make_panel, pixel_term, sharpen_target,
                     soft_loss)
from models import create_model, save_weights

PEAK, START, FINAL = 0.064, 6.4e-4, 6.4e-4


def test_warmup_then_cosine_closed_form():
    s = WarmupCosine(total_steps=100, warmup_steps=10, lr_peak=PEAK, lr_start=START, lr_final=FINAL)
    assert s(0) == pytest.approx(START)
    assert s(5) == pytest.approx(START + (PEAK - START) * 0.5)          # linear half way
    assert s(10) == pytest.approx(PEAK)                                  # end of warm-up = peak
    assert s(55) == pytest.approx(FINAL + (PEAK - FINAL) * 0.5)          # cos(pi/2) = 0: half way down
    assert s(25) == pytest.approx(FINAL + (PEAK - FINAL) * 0.5 * (1 + math.cos(math.pi / 6)))
    assert s(100) == pytest.approx(FINAL) and s(1000) == pytest.approx(FINAL)  # clamped after the end
    values = [s(t) for t in range(101)]
    assert all(a < b for a, b in zip(values[:10], values[1:11]))        # rises during warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:]))        # never rises afterwards


def test_schedule_without_warmup_and_bad_arguments():
    s = WarmupCosine(total_steps=4, warmup_steps=0, lr_peak=1.0, lr_start=0.0, lr_final=0.0)
    assert [s(t) for t in range(5)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                      (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    assert WarmupCosine(total_steps=3, warmup_steps=3, lr_peak=1.0, lr_start=0.0)(3) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(total_steps=3, warmup_steps=4)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError, match="step"):
        s(-1)


def test_param_groups_split_backbone_and_follow_the_schedule():
    model = create_model("scfnet_m3")
    groups = with_lr_mult(model.param_groups(PEAK, 0.1, weight_decay=5e-4), PEAK)
    names = [g["name"] for g in groups]
    assert names == ["backbone", "head"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))   # each parameter exactly once
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[0]["params"]} == backbone_ids
    assert [g["lr_mult"] for g in groups] == pytest.approx([0.1, 1.0])
    opt = torch.optim.SGD(groups, lr=PEAK, momentum=0.9)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01])
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 5e-4]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert [g["name"] for g in model.param_groups(PEAK)] == ["head"]     # a frozen backbone drops out


def test_model_lr_mult_gives_named_parts_their_own_rate():
    model = create_model("scfnet_m3")
    freeze_parts(model, ["mapping"])
    groups = with_lr_mult(model.param_groups(PEAK, 0.1), PEAK)
    lr_mult = {"heads": 0.01, "scfm*": 0.2, "scfm2": 0.5, "backbone.stem": 2.0}
    out = part_lr_groups(model, groups, lr_mult, PEAK)
    by_name = {g["name"]: g for g in out}
    assert list(by_name) == ["backbone", "head", "lr_mult:heads", "lr_mult:scfm*", "lr_mult:backbone.stem"]
    ids = [id(p) for g in out for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)          # each trainable parameter once; frozen ones nowhere
    assert {id(p) for p in by_name["lr_mult:heads"]["params"]} == {id(p) for p in model.heads.parameters()}
    scfm = {id(p) for n, p in model.named_parameters() if n.startswith("scfm")}
    assert {id(p) for p in by_name["lr_mult:scfm*"]["params"]} == scfm          # the first pattern wins scfm2
    assert {id(p) for p in by_name["lr_mult:backbone.stem"]["params"]} == {
        id(p) for p in model.backbone.stem.parameters()}                  # out of the backbone group
    assert not {id(p) for p in model.backbone.stem.parameters()} & {id(p) for p in by_name["backbone"]["params"]}
    opt = torch.optim.SGD(out, lr=PEAK, momentum=0.9)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01, 0.0001, 0.002, 0.02])
    # validated when the config is read, with the dotted path
    with pytest.raises(ConfigError, match=r"model\.lr_mult\.haeds: 'haeds' names no parameter .*heads"):
        ModelConfig(lr_mult={"haeds": 0.1})
    for bad in (0, -1.0, float("nan"), "0.1", True):
        with pytest.raises(ConfigError, match=r"model\.lr_mult\.heads: must be a finite number > 0"):
            ModelConfig(lr_mult={"heads": bad})


def _logits(b=4, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, s, s, generator=g) for _ in range(4)]


def test_batch_loss_hard_soft_and_mixed():
    logits = _logits()
    target = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    band = 3
    hard = torch.zeros(4, dtype=torch.bool)
    torch.testing.assert_close(batch_loss(logits, target, hard, band), teacher_loss(logits, target, band))
    torch.testing.assert_close(batch_loss(logits, target, ~hard, band), kd_dice_loss(logits, target))
    soft = torch.tensor([True, False, False, True])
    expected = (2 * kd_dice_loss([x[soft] for x in logits], target[soft])
                + 2 * teacher_loss([x[~soft] for x in logits], target[~soft], band)) / 4
    torch.testing.assert_close(batch_loss(logits, target, soft, band), expected)
    with pytest.raises(ValueError, match="soft"):
        batch_loss(logits, target, torch.zeros(3, dtype=torch.bool), band)


def test_kd_pixel_term_adds_the_deep_supervised_bce_to_soft_rows_only():
    logits = _logits()
    t = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))   # a teacher's soft map
    band, w = 3, 0.7
    bce = sum(sw * F.binary_cross_entropy_with_logits(x, t) for sw, x in zip((1, 0.5, 0.25, 0.125), logits))
    every_soft = torch.ones(4, dtype=torch.bool)
    cfg = KDLoss(pixel="bce", pixel_weight=w)
    torch.testing.assert_close(batch_loss(logits, t, every_soft, band, cfg), kd_dice_loss(logits, t) + w * bce)
    hard = torch.zeros(4, dtype=torch.bool)   # masks keep the mask loss whatever the kd section says
    m = (t > 0.5).float()
    torch.testing.assert_close(batch_loss(logits, m, hard, band, cfg), teacher_loss(logits, m, band))
    # BCE only: the loss is stationary exactly where the student's map equals the teacher's, pixel by pixel
    z = torch.logit(t.clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
    batch_loss([z] * 4, t, every_soft, band, KDLoss(structure="none", pixel="bce")).backward()
    assert z.grad.abs().max() < 1e-6
    with pytest.raises(ConfigError, match="kd.pixel_weight"):
        KDLoss(pixel="bce", pixel_weight=-1.0)
    with pytest.raises(ConfigError, match="nothing to learn"):
        KDLoss(structure="none", pixel="none")


def test_soft_dice_optimum_is_a_thresholded_map_and_bce_is_calibrated():
    """The docstring's argument, numerically: minimise each loss over p in [0, 1] for a soft target."""
    t = torch.linspace(0.05, 0.95, 64).view(1, 1, 8, 8)
    results = {}
    for name, cfg in (("dice", KDLoss()), ("bce", KDLoss(structure="none", pixel="bce")),
                      ("conf", KDLoss(structure="none", pixel="bce", confidence="teacher"))):
        z = torch.zeros_like(t, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(1500):
            opt.zero_grad()
            soft_loss([z], t, cfg, weights=(1.0,)).backward()
            opt.step()
        results[name] = torch.sigmoid(z).detach()
    p = results["dice"]
    assert ((p > 0.9) | (p < 0.1)).float().mean() > 0.9          # thresholded ...
    assert (p > 0.5).float().mean() > (t > 0.5).float().mean()     # ... and larger than the teacher's map
    torch.testing.assert_close(results["bce"], t, atol=2e-3, rtol=0)   # calibrated: p = t
    torch.testing.assert_close(results["conf"], t, atol=2e-3, rtol=0)  # weights depending on t keep p = t


def test_sharpened_target_is_the_optimum_and_moves_towards_the_mae_optimal_hard_map():
    """kd.sharpen: BCE then learns sigmoid(logit(t)/s); s=0 learns t > 0.5, the map of least expected MAE."""
    t = torch.linspace(0.05, 0.95, 64).view(1, 1, 8, 8)
    learned = {}
    for s_ in (1.0, 0.5, 0.0):
        z = torch.zeros_like(t, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        cfg = KDLoss(structure="none", pixel="bce", confidence="teacher", sharpen=s_)
        for _ in range(1500):
            opt.zero_grad()
            soft_loss([z], t, cfg, weights=(1.0,)).backward()
            opt.step()
        learned[s_] = torch.sigmoid(z).detach()
    torch.testing.assert_close(learned[1.0], t, atol=2e-3, rtol=0)
    torch.testing.assert_close(learned[0.5], sharpen_target(t, 0.5), atol=2e-3, rtol=0)
    torch.testing.assert_close(sharpen_target(t, 0.5), torch.sigmoid(2 * torch.logit(t)))
    assert ((learned[0.0] > 0.98) == (t > 0.5)).all() and ((learned[0.0] < 0.02) == (t <= 0.5)).all()

    def expected_mae(p):   # a calibrated teacher: the pixel is salient with probability t
        return float((t * (1 - p) + (1 - t) * p).mean())
    assert expected_mae(learned[0.0]) < expected_mae(learned[0.5]) < expected_mae(learned[1.0])
    with pytest.raises(ConfigError, match="kd.sharpen"):
        KDLoss(sharpen=1.5)
    assert "sharpened s=0.5" in KDLoss(pixel="bce", sharpen=0.5).describe()


def test_kl_is_bce_minus_entropy_and_temperature_keeps_the_optimum():
    z = torch.randn(2, 1, 8, 8)
    t = torch.rand(2, 1, 8, 8).clamp(0.01, 0.99)
    bce = pixel_term(z, t, KDLoss(pixel="bce"))
    kl = pixel_term(z, t, KDLoss(pixel="kl"))
    ent = -(t * t.log() + (1 - t) * (1 - t).log()).mean()
    torch.testing.assert_close(kl, bce - ent, atol=1e-4, rtol=1e-4)
    at_opt = pixel_term(torch.logit(t), t, KDLoss(pixel="kl", temperature=3.0))
    assert float(at_opt) == pytest.approx(0.0, abs=1e-4)
    w = confidence_weights(torch.tensor([0.0, 0.5, 1.0]), 0.25)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25, 1.0]))


def test_mask_loss_options():
    logits = _logits()
    m = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    hard = torch.zeros(4, dtype=torch.bool)
    paper = batch_loss(logits, m, hard, 3)
    torch.testing.assert_close(paper, teacher_loss(logits, m, 3))
    no_edge = batch_loss(logits, m, hard, 3, mask=MaskLoss(boundary=0.0))
    torch.testing.assert_close(no_edge, kd_dice_loss(logits, m))
    bce = sum(sw * F.binary_cross_entropy_with_logits(x, m) for sw, x in zip((1, 0.5, 0.25, 0.125), logits))
    torch.testing.assert_close(batch_loss(logits, m, hard, 3, mask=MaskLoss(boundary=0.0, bce=2.0)),
                               kd_dice_loss(logits, m) + 2.0 * bce)


def test_make_panel_layout():
    img = np.full((20, 30, 3), 200, np.uint8)
    prob = np.full((10, 10), 0.5, np.float32)
    mask = np.full((40, 40), 255, np.uint8)
    panel = make_panel([[img, None, prob, mask], [img, None, prob, mask]], tile=32, gap=2)
    assert panel.shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)
    assert (panel[:32, 34:66] == 0).all()                 # None: a black tile
    assert (panel[:32, :32] == 200).all()                 # the image tile
    assert (panel[:32, 68:100] == 128).all()              # 0.5 -> 128
    assert (panel[:32, 32:34] == 255).all()               # white gap
    with pytest.raises(ValueError, match="same number"):
        make_panel([[img, mask], [img]])


def _cfg(**over):
    base = {"mode": "supervised", "data": {"paired": [{"uri": "/data/duts"}]}}
    for dotted, value in over.items():
        node = base
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return base


def test_train_config_defaults_are_the_papers_recipe():
    cfg = load_train_config(_cfg())
    o = cfg.optim
    assert (o.epochs, o.batch_size, o.lr, o.lr_start, o.lr_final, o.warmup_epochs) == (69, 128, 0.064, 6.4e-4, 6.4e-4, 5.0)
    assert (o.momentum, o.weight_decay, o.backbone_lr_mult) == (0.9, 5e-4, 0.1)
    assert cfg.data.sizes == (224, 256, 288, 320, 352)
    assert cfg.data.augment.hflip_p == 0.5 and cfg.data.augment.vflip_p == 0.2


@pytest.mark.parametrize("over, message", [
    ({"mode": "teacher", "data.paired": []}, "data.paired"),
    ({"mode": "supervised", "data.unlabeled": [{"uri": "/u"}]}, "data.unlabeled"),
    ({"mode": "distill", "data.paired": [], "data.unlabeled": [{"uri": "/u"}]}, r"data.unlabeled\[0\].labels"),
    ({"optim.batch_size": 6, "scaling.num_workers": 4}, "does not split evenly"),
    ({"debug.fail_at_step": 3, "debug.fail_marker": "/m", "scaling.num_workers": 0}, "debug.fail_at_step"),
    ({"debug.fail_at_step": 3, "scaling.num_workers": 2}, "debug.fail_marker"),
    ({"scaling.strategy": "deepspeed", "scaling.zero_stage": 3}, "scaling.zero_stage"),
    ({"scaling.bf16": True}, "scaling.bf16"),
    ({"model.name": "scfnet_x"}, "model.name"),
    ({"optim.lr": "fast"}, "optim.lr: expected float"),
    ({"optim.warmup": 1}, "optim.warmup: unknown key"),
    ({"output.calibrate": True, "val.uri": None}, "output.calibrate: .* set val.uri"),
    ({"output.max_s_drop": -1}, "output.max_s_drop: must be >= 0"),
])
def test_train_config_rejects_bad_input_naming_the_key(over, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(_cfg(**over))


def test_distill_config_with_online_teacher_and_offline_labels():
    cfg = load_train_config(_cfg(**{"mode": "distill", "data.paired": [],
                                    "data.unlabeled": [{"uri": "/u", "labels": "/l"}, {"uri": "/v"}],
                                    "data.teacher.teachers": ["scfnet_r50:/w.pt"],
                                    "scaling.num_workers": 2, "optim.batch_size": 8}))
    assert cfg.per_worker_batch == 4 and cfg.data.unlabeled[0].labels == "/l"
    assert isinstance(cfg, TrainConfig)


def test_steps_per_epoch_drops_partial_batches():
    assert steps_per_epoch(8, 4, 0) == 2          # in-process: one worker
    assert steps_per_epoch(8, 4, 2) == 2          # 4 rows per worker, 2 per batch
    assert steps_per_epoch(9, 4, 2) == 2          # the odd row is dropped by the even split
    assert steps_per_epoch(5277, 128, 4) == 41
    with pytest.raises(ValueError, match="no full batch"):
        steps_per_epoch(3, 4, 1)


def _print_config(capsys, *argv):
    assert cli.main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_commands_resolve_their_yaml_and_mode(capsys):
    t = _print_config(capsys, "train-teacher", "--paired", "/d/duts", "--val", "/d/ecssd", "optim.epochs=3")
    assert (t["mode"], t["model"]["name"], t["optim"]["epochs"]) == ("teacher", "scfnet_r50", 3)
    assert t["data"]["paired"][0]["uri"] == "/d/duts" and t["val"]["uri"] == "/d/ecssd"
    f = _print_config(capsys, "train", "--supervised", "--paired", "/d/duts", "--name", "fs1")
    assert (f["mode"], f["model"]["name"], f["run"]["name"]) == ("supervised", "scfnet_m3", "fs1")
    k = _print_config(capsys, "distill", "--unlabeled", "/u1", "--labels", "/l1", "--unlabeled", "/u2",
                      "--labels", "/l2", "scaling.num_workers=2")
    assert k["mode"] == "distill" and [u["labels"] for u in k["data"]["unlabeled"]] == ["/l1", "/l2"]
    assert k["scaling"]["num_workers"] == 2


def test_cli_errors_are_one_line_and_name_the_problem(capsys):
    assert cli.main(["train", "--paired", "/d"]) == 2
    assert "pass --supervised" in capsys.readouterr().err
    assert cli.main(["distill", "--unlabeled", "/u", "optim.epochs=many"]) == 2
    assert "optim.epochs: expected int" in capsys.readouterr().err
    assert cli.main(["distill", "--unlabeled", "/u", "--unlabeled", "/v", "--labels", "/l"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert cli.main(["train-teacher", "--paired", "/d", "mode=distill"]) == 2
    assert "trains mode teacher" in capsys.readouterr().err


def test_start_weights_from_config_and_clear_errors(tmp_path):
    from cluster.training.image import apply_start_weights
    src = create_model("scfnet_m3")
    torch.save(src.backbone.state_dict(), tmp_path / "encoder.pth")     # an encoder state dict on disk
    torch.save(create_model("scfnet_r18").backbone.state_dict(), tmp_path / "resnet.pth")
    cfg = load_train_config({"mode": "supervised", "data": {"paired": [{"uri": "/x"}]},
                             "model": {"name": "scfnet_m3", "backbone_weights": str(tmp_path / "encoder.pth")}})
    dst = create_model("scfnet_m3")
    apply_start_weights(dst, cfg, verbose=False)
    for k, v in src.backbone.state_dict().items():
        torch.testing.assert_close(dst.backbone.state_dict()[k], v)
    wrong = load_train_config({"mode": "supervised", "data": {"paired": [{"uri": "/x"}]},
                               "model": {"backbone_weights": str(tmp_path / "resnet.pth")}})
    with pytest.raises(ConfigError, match=r"model\.backbone_weights: .*resnet\.pth"):
        apply_start_weights(create_model("scfnet_m3"), wrong)
    missing = load_train_config({"mode": "supervised", "data": {"paired": [{"uri": "/x"}]},
                                 "model": {"init_weights": str(tmp_path / "nope.pt")}})
    with pytest.raises(ConfigError, match=r"model\.init_weights: file not found"):
        apply_start_weights(create_model("scfnet_m3"), missing)
    # a calibrated file (sodkd calibrate: heads[0] x 4, output_scale 4 in its header) starts training as trained
    from models.fuse import scale_output
    save_weights(scale_output(create_model("scfnet_m3").eval(), 4.0), tmp_path / "cal.pt",
                 extra_meta={"output_scale": 4.0})
    cal = load_train_config({"mode": "supervised", "data": {"paired": [{"uri": "/x"}]},
                             "model": {"init_weights": str(tmp_path / "cal.pt")}})
    dst = create_model("scfnet_m3")
    apply_start_weights(dst, cal, verbose=False)
    stored = torch.load(tmp_path / "cal.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(dst.heads[0].weight, stored["heads.0.weight"] / 4.0)
    torch.testing.assert_close(dst.heads[1].weight, stored["heads.1.weight"])


def test_init_weights_of_a_widened_model_train_as_themselves(tmp_path):
    from cluster.training.image import apply_start_weights
    from cluster.training.launch import config_from_init_weights
    from models import save_weights
    from models.scfnet import widen_decoder
    wide = widen_decoder(create_model("scfnet_m3", channels=8), 12)
    save_weights(wide, tmp_path / "wide.pt")
    base = {"mode": "supervised", "data": {"paired": [{"uri": "/x"}]}}
    cfg = load_train_config({**base, "model": {"name": "scfnet_m3", "init_weights": str(tmp_path / "wide.pt")}})
    with pytest.raises(ConfigError, match=r"(?s)model\.init_weights: .*wide\.pt.*size mismatch"):
        apply_start_weights(create_model("scfnet_m3"), cfg)           # the default c = 16 does not fit
    done = config_from_init_weights(cfg)
    assert done.model.kwargs["channels"] == 12 and cfg.model.kwargs == {}
    model = create_model(done.model.name, **done.model.kwargs)
    apply_start_weights(model, done)
    for k, v in wide.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    given = load_train_config({**base, "model": {"init_weights": str(tmp_path / "wide.pt"),
                                                 "kwargs": {"dilation": 3}}})
    assert config_from_init_weights(given).model.kwargs["dilation"] == 3   # explicit keys win
    torch.save(wide.state_dict(), tmp_path / "bare.pt")                     # no header: left as it is
    bare = load_train_config({**base, "model": {"init_weights": str(tmp_path / "bare.pt")}})
    assert config_from_init_weights(bare).model.kwargs == {}
    # a video student started from the widened image student takes its width too
    from cluster.training.video import build_student, load_video_config
    video = load_video_config({"data": {"labels": "/l", "images": "/i"},
                               "model": {"name": "video_scfnet_m3", "init_weights": str(tmp_path / "wide.pt")}})
    vdone = config_from_init_weights(video)
    assert vdone.model.kwargs["channels"] == 12
    student = build_student(vdone)
    assert student.config["channels"] == 12
    torch.testing.assert_close(student.state_dict()["scfm2.cv3.0.weight"], wide.state_dict()["scfm2.cv3.0.weight"])


def test_image_training_runs_channels_last_by_default_with_the_same_maths():
    from cluster.training.image import ImageTask
    from kd.step import KDLoss, batch_loss
    from models import create_model
    assert ImageTask(_cfg()).channels_last
    assert not ImageTask(_cfg(**{"scaling.channels_last": False})).channels_last
    assert not ImageTask(_cfg(**{"scaling.strategy": "deepspeed"})).channels_last
    with pytest.raises(ConfigError, match="scaling.channels_last"):
        load_train_config(_cfg(**{"scaling.channels_last": "yes"}))

    def run(dtype):
        torch.manual_seed(0)
        nchw = create_model("scfnet_m3").train().to(dtype)
        nhwc = create_model("scfnet_m3").train().to(dtype)
        nhwc.load_state_dict(nchw.state_dict())
        nhwc.to(memory_format=torch.channels_last)
        assert next(p for p in nhwc.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
        x, target = torch.rand(2, 3, 64, 64, dtype=dtype), torch.rand(2, 1, 64, 64, dtype=dtype)
        losses = []
        for net, inp in ((nchw, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
            loss = batch_loss(net(inp), target, torch.ones(2, dtype=torch.bool), 3, KDLoss(pixel="bce"))
            loss.backward()
            losses.append(loss.detach())
        return losses, nchw, nhwc

    # the fp32 forward (oneDNN's kernels in both layouts): the same loss to float rounding
    losses, _, _ = run(torch.float32)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    # the same maths: in float64 the loss and every gradient agree to rounding. (fp32 gradients are compared in
    # RESULTS train-layout, not here: rounding that puts one pre-activation on the other side of a ReLU or
    # hard-swish kink moves gradients upstream of it by up to a percent, NCHW against float64 as much as NHWC)
    losses, nchw, nhwc = run(torch.float64)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    total = torch.sqrt(sum((a.grad ** 2).sum() for a in nchw.parameters()))
    for (name, a), b in zip(nchw.named_parameters(), nhwc.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-9 * total, name
