"""Weights that know their size: the training resolution travels in the file, and every consumer defaults to it."""

from __future__ import annotations

import pytest

from cluster.teachers import load_teacher
from jobs.predict_cmd import make_predictor
from models import create_model, load_state, load_weights, read_metadata, save_weights


def test_input_size_round_trips_and_is_the_default_everywhere(tmp_path):
    m = create_model("scfnet_m3")
    m.input_size = 224
    save_weights(m, tmp_path / "m.pt", half=True)
    assert read_metadata(tmp_path / "m.pt")["input_size"] == 224
    assert load_weights(tmp_path / "m.pt").input_size == 224
    fresh = create_model("scfnet_m3")
    assert fresh.input_size == 352 and load_state(fresh, tmp_path / "m.pt").input_size == 224
    assert load_teacher(f"scfnet_m3:{tmp_path / 'm.pt'}", device="cpu").input_size == 224   # label, eval
    assert make_predictor(None, tmp_path / "m.pt", None, "cpu").size == 224                  # predict
    assert make_predictor(None, tmp_path / "m.pt", 320, "cpu").size == 320                   # --size wins
    with pytest.raises(ValueError, match="reserved"):
        save_weights(m, tmp_path / "x.pt", extra_meta={"input_size": 100})
