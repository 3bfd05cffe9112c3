"""Pure parts of the foundation teacher (no models, no Ray): confidence formula, stability, NMS, captions,
config validation, and the label-shard columns."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from cluster import foundation as fm
from cluster.label import foundation as fm_stages
from kd import schema
from kd.config import ConfigError, load_config


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_confidence_map_by_hand():
    # two objects on a 1x3 image: object 0 owns pixel 0, object 1 owns pixel 2, pixel 1 is undecided
    logits = np.array([[[4.0, 0.0, -3.0]],
                       [[-2.0, 0.0, 2.0]]], np.float32)
    box = np.array([0.9, 0.5], np.float32)
    iou = np.array([1.3, 0.8], np.float32)        # predicted IoU above 1 is clipped to 1
    stab = np.array([0.5, 1.0], np.float32)
    p, c, q = fm.confidence_map(logits, box, iou, stab)
    np.testing.assert_allclose(q, [0.9 * 1.0 * 0.5, 0.5 * 0.8 * 1.0], rtol=1e-6)
    np.testing.assert_allclose(p[0], [_sig(4), 0.5, _sig(2)], rtol=1e-6)
    np.testing.assert_allclose(c[0], [0.45 * (2 * _sig(4) - 1), 0.0, 0.4 * (2 * _sig(2) - 1)], rtol=1e-5, atol=1e-7)
    assert p.dtype == c.dtype == np.float32


def test_confidence_map_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="K>0"):
        fm.confidence_map(np.zeros((0, 2, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="pred_iou"):
        fm.confidence_map(np.zeros((2, 2, 2)), np.zeros(2), np.zeros(3), np.zeros(2))


def test_stability_score():
    m = np.array([2.0, 0.5, -0.5, -2.0, 1.5])
    assert fm.stability_score(m, 1.0) == pytest.approx(2 / 4)   # >1: {2, 1.5}; >-1: {2, .5, -.5, 1.5}
    assert fm.stability_score(m, 0.1) == pytest.approx(3 / 3 * 3 / 3)  # >0.1: 3; >-0.1: 3
    assert fm.stability_score(np.full(4, -5.0), 1.0) == 0.0


def test_nms_keeps_best_and_drops_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.5, 0.9, 0.7, 0.4], np.float32)
    # box1 (0.9) overlaps box0 by 81/100 and box3 by 72/(81+90-72)=0.727
    assert fm.nms(boxes, scores, 0.7).tolist() == [1, 2]
    assert fm.nms(boxes, scores, 0.95).tolist() == [1, 2, 0, 3]
    assert fm.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).tolist() == []


def test_caption_to_query():
    assert fm.caption_to_query("A picture of  a Brown Dog.", "a picture of") == "a brown dog."
    assert fm.caption_to_query("  ", fallback="The main object") == "the main object."
    assert fm.caption_to_query("a picture of", "a picture of") == "the main object."
    assert fm.caption_to_query("cat, ") == "cat."


def test_configs_are_strict_and_name_the_key():
    cfg = load_config(fm.FoundationConfig, {"segmenter": {"resources": {"pool_size": 3, "num_gpus": 0.5}},
                                            "captioner": {"fixed_prompt": "a dog"}})
    assert cfg.segmenter.resources.pool_size == 3 and cfg.captioner.fixed_prompt == "a dog"
    assert "prompt='a dog'" in fm.teacher_id(cfg) and "sam=facebook/sam-vit-base" in fm.teacher_id(cfg)
    with pytest.raises(ConfigError, match="detector.box_thresh"):
        load_config(fm.FoundationConfig, {"detector": {"box_thresh": 0.2}})
    with pytest.raises(ConfigError, match="max_pool_size"):
        load_config(fm.FoundationConfig, {"detector": {"resources": {"pool_size": 2, "max_pool_size": 1}}})
    with pytest.raises(ConfigError, match="fixed_prompt"):
        load_config(fm.FoundationConfig, {"captioner": {"fixed_prompt": " "}})
    with pytest.raises(ConfigError, match="box_threshold"):
        load_config(fm.FoundationConfig, {"detector": {"box_threshold": 1.5}})


def test_foundation_columns_encode_conf_png_and_ragged_boxes():
    conf = np.arange(12, dtype=np.uint8).reshape(1, 3, 4).repeat(2, axis=0)
    batch = {schema.CONF: conf, schema.CAPTION: np.array(["a dog", "a cat"], dtype=object),
             schema.BOXES: fm_stages._object_array([np.arange(8, dtype=np.float32), np.arange(4, dtype=np.float32)]),
             schema.BOX_SCORES: fm_stages._object_array([np.array([0.9, 0.5], np.float32), np.array([0.3], np.float32)]),
             schema.MASK_SCORES: fm_stages._object_array([np.array([0.1, 0.2], np.float32), np.array([0.7], np.float32)])}
    cols = fm.foundation_columns(batch, np.array([1, 0]))
    assert cols[schema.CAPTION] == ["a cat", "a dog"]
    assert cols[schema.BOXES] == [[0, 1, 2, 3], list(range(8))]
    assert cols[schema.BOX_SCORES][0] == pytest.approx([0.3])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(cols[schema.CONF_PNG][0]))), conf[1])
    import pyarrow as pa
    table = pa.table(cols, schema=pa.schema(fm.foundation_fields()))
    assert table.num_rows == 2 and table.schema.field(schema.BOXES).type == pa.list_(pa.float32())


def test_label_and_train_configs_select_the_foundation_teacher():
    import argparse

    from jobs import label_cmd, train_cmd

    p = argparse.ArgumentParser()
    label_cmd.add_arguments(p)
    cfg = label_cmd.build_config(p.parse_args(["--config", "jobs/configs/foundation.yaml", "--input", "in",
                                               "--output", "out", "foundation.segmenter.resources.pool_size=3"]))
    assert cfg.is_foundation and cfg.foundation.segmenter.resources.pool_size == 3
    assert cfg.foundation.detector.model == "IDEA-Research/grounding-dino-tiny"
    plain = label_cmd.build_config(p.parse_args(["--input", "in", "--output", "out", "--teacher", "foundation"]))
    assert plain.is_foundation and plain.foundation == fm.FoundationConfig()  # hub ids by default
    with pytest.raises(ConfigError, match="cannot be ensembled"):
        label_cmd.build_config(p.parse_args(["--input", "in", "--output", "out", "--teacher", "foundation",
                                             "--teacher", "scfnet_r50:w.pt"]))
    with pytest.raises(ConfigError, match="only used with teachers"):
        label_cmd.build_config(p.parse_args(["--input", "in", "--output", "out", "--teacher", "scfnet_r50:w.pt",
                                             "foundation.image_size=256"]))

    q = argparse.ArgumentParser()
    train_cmd.add_arguments(q)
    q.set_defaults(command="train-fm")   # what `sodkd train-fm` sets (jobs/cli.py)
    tcfg = train_cmd.build_config(q.parse_args(["--labels", "l", "--images", "i", "--teacher-labels", "t",
                                                "fm.w_edge=0.25"]))
    assert tcfg.mode == "foundation" and tcfg.model.name == "dedecoder_m3"
    assert tcfg.fm.w_edge == 0.25 and tcfg.fm.conf_threshold == 0.5
    (src,) = tcfg.data.unlabeled
    assert (src.uri, src.labels, src.teacher_labels) == ("i", "l", "t")
    with pytest.raises(ConfigError, match="fm.w_iuo"):
        train_cmd.build_config(q.parse_args(["--labels", "l", "--images", "i", "fm.w_iuo=1"]))
    with pytest.raises(ConfigError, match="--teacher-labels: give one per"):
        train_cmd.build_config(q.parse_args(["--labels", "l", "--images", "i", "--images", "j", "--labels",
                                             "m", "--teacher-labels", "t"]))
    with pytest.raises(ConfigError, match=r"data.unlabeled\[0\].labels: mode foundation trains on stored"):
        train_cmd.build_config(q.parse_args(["--images", "i"]))


def test_teacher_labels_are_refused_outside_mode_foundation():
    from cluster.training.sections import load_train_config

    with pytest.raises(ConfigError, match=r"data.unlabeled\[0\].teacher_labels: fusion is for mode foundation"):
        load_train_config({"mode": "distill", "data": {"unlabeled": [{"uri": "i", "labels": "l",
                                                                      "teacher_labels": "t"}]}})
