import dataclasses
import typing
from pathlib import Path
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


@dataclasses.dataclass(frozen=True)
class Loose:
    scale: float | None = None
    weights: tuple[float, ...] = (1.0,)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    free: typing.Any = None
    steps: int = 1


@pytest.mark.parametrize("override, message", [
    ("train.optim.lr=.nan", "train.optim.lr: must be a finite number, got nan"),
    ("train.optim.momentum=.inf", "train.optim.momentum: must be a finite number, got inf"),
    ("train.optim.lr=-.inf", "train.optim.lr: must be a finite number, got -inf"),
    ("train.epochs=.inf", "train.epochs: must be a finite number, got inf"),   # an int field: the same words
    ("train.sizes=[224, .nan]", "train.sizes[1]: must be a finite number, got nan"),
])
def test_nan_and_infinity_are_rejected_with_the_dotted_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(Job, {}, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("data, message", [
    ({"scale": float("nan")}, "scale: must be a finite number, got nan"),        # float | None: not 'expected'
    ({"weights": [1.0, float("inf")]}, "weights[1]: must be a finite number, got inf"),
    ({"extra": {"a": float("-inf")}}, "extra.a: must be a finite number, got -inf"),
    ({"free": {"deep": [0, {"x": float("nan")}]}}, "free.deep[1].x: must be a finite number, got nan"),
])
def test_nan_and_infinity_are_rejected_under_unions_containers_and_any(data, message):
    with pytest.raises(ConfigError) as err:
        load_config(Loose, data)
    assert str(err.value) == message
    assert load_config(Loose, {"scale": 1e308, "free": {"deep": [0, {"x": -2.5}]}}).scale == 1e308


def test_every_job_config_rejects_nan_and_infinity_through_the_loader():
    """Train, label, video and foundation (fm) configs all go through kd.config.load_config."""
    from cluster.label import load_label_config
    from cluster.training.sections import load_train_config
    from cluster.training.video import load_video_config

    configs = Path(__file__).resolve().parents[2] / "jobs" / "configs"
    train = {"data": {"paired": [{"uri": "/d"}]}}
    cases = [
        (lambda o: load_train_config(train, [o]), "optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
        (lambda o: load_train_config(train, [o]), "kd.temperature=.inf",
         "kd.temperature: must be a finite number, got inf"),
        (lambda o: load_train_config(configs / "train_fm.yaml", ["data.unlabeled=[{uri: /u, labels: /l}]", o]),
         "fm.conf_threshold=.nan", "fm.conf_threshold: must be a finite number, got nan"),
        (lambda o: load_label_config({"input": "a", "output": "b", "teachers": ["t.ts"]}, [o]),
         "pool.num_gpus=.inf", "pool.num_gpus: must be a finite number, got inf"),
        (lambda o: load_video_config(configs / "distill-video.yaml", ["data.labels=/l", "data.images=/i", o]),
         "loss.relation_tau=-.inf", "loss.relation_tau: must be a finite number, got -inf"),
    ]
    for load, override, message in cases:
        with pytest.raises(ConfigError) as err:
            load(override)
        assert str(err.value) == message, override
