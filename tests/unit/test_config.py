import dataclasses
from typing import Literal

import pytest

from kd.config import ConfigError, load_config, parse_overrides, to_flat_dict


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 0.064
    momentum: float = 0.9
    kind: Literal["sgd", "adamw"] = "sgd"


@dataclasses.dataclass(frozen=True)
class Train:
    epochs: int = 69
    sizes: tuple[int, ...] = (224, 256)
    optim: Optim = Optim()
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    train: Train = Train()
    seed: int = 0


def test_defaults_and_nested_values():
    cfg = load_config(Job, {"train": {"epochs": 3, "optim": {"lr": 1}}})
    assert cfg.train.epochs == 3
    assert cfg.train.optim.lr == 1.0 and isinstance(cfg.train.optim.lr, float)
    assert cfg.train.sizes == (224, 256)
    assert cfg.seed == 0


@pytest.mark.parametrize("data, path", [
    ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
    ({"train": {"optim": {"lr": "fast"}}}, "train.optim.lr: expected float"),
    ({"train": {"optim": {"kind": "adam"}}}, "train.optim.kind: expected one of"),
    ({"train": {"sizes": [224, "x"]}}, "train.sizes[1]: expected int"),
    ({"train": {"epochs": True}}, "train.epochs: expected int"),
    ({"train": 5}, "train: expected a mapping"),
    ({"bogus": 1}, "bogus: unknown key"),
])
def test_bad_keys_and_types_name_the_dotted_path(data, path):
    with pytest.raises(ConfigError) as err:
        load_config(Job, data)
    assert str(err.value).startswith(path), str(err.value)


def test_overrides_use_dotted_paths_and_yaml_values():
    cfg = load_config(Job, {"train": {"epochs": 3}}, ["--train.optim.lr=0.01", "train.sizes=[320, 352]",
                                                     "train.name=null", "seed=7"])
    assert cfg.train.optim.lr == 0.01 and cfg.train.sizes == (320, 352)
    assert cfg.train.name is None and cfg.seed == 7 and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match=r"^train\.optim\.lrr: unknown key"):
        load_config(Job, None, ["--train.optim.lrr=1"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["train.lr"])


def test_yaml_file_and_flat_params(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("train:\n  epochs: 2\n  optim: {kind: adamw}\n")
    cfg = load_config(Job, p)
    flat = to_flat_dict(cfg)
    assert flat["train.epochs"] == 2 and flat["train.optim.kind"] == "adamw"
    assert flat["train.sizes"] == [224, 256]
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Job, tmp_path / "list.yaml")
