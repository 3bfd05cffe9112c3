"""The training jobs' configuration: the sections every task shares and the image task's job config.

Shared by every task (image, foundation, video): :class:`ModelConfig`, :class:`OptimConfig`,
:class:`ScalingSection`, :class:`RunSection`, :class:`OutputConfig`, :class:`DebugConfig` (and the MLflow
section, :class:`cluster.tracking.TrainTracking`). The image job's config is :class:`TrainConfig` (modes
teacher, supervised, distill, foundation) with its data sources and validation; the video job's is
:class:`cluster.training.video.VideoTrainConfig`. YAML files under ``jobs/configs/`` are validated into these
(:mod:`kd.config`: unknown keys and wrong types are errors naming the dotted key).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Protocol

from cluster.raypool import PoolConfig, torch_threads
from cluster.storage import S3Config
from cluster.teachers.spec import EnsembleConfig
from cluster.tracking import TrainTracking
from kd.augment import TEST_SIZE, TRAIN_SIZES, AugmentConfig
from kd.config import ConfigError, load_config
from kd.pseudo_labels import FMLossConfig
from kd.step import KDLoss, MaskLoss

__all__ = ["ModelConfig", "PairedSource", "UnlabeledSource", "OnlineTeacherConfig", "DataSection", "ValConfig",
           "OptimConfig", "ScalingSection", "RunSection", "OutputConfig", "DebugConfig", "TrainConfig",
           "RunConfig", "load_train_config", "Mode", "frozen_names", "freeze_parts",
           "part_lr_groups"]

Mode = Literal["teacher", "supervised", "distill", "foundation"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which network: a registered name, constructor overrides, optional starting weights.

    ``backbone_weights``: a torchvision- or timm-format ImageNet state dict for the encoder (MobileNetV3 or
    ResNet; :func:`models.load_backbone_weights` maps the keys, checks shapes and prints what it loaded);
    ``init_weights`` (a whole sodkd model) is applied after it. Both are checked on the driver before any
    worker starts. ``freeze``: parts that keep their starting weights (:func:`frozen_names`), e.g. every part a
    video student shares with the image student it starts from, so that only its new temporal parts learn.
    ``lr_mult``: a learning rate per part, ``{pattern: m}`` (patterns as ``freeze``'s): the named parameters train
    at ``m * optim.lr`` (instead of ``optim.lr``, or ``optim.backbone_lr_mult * optim.lr`` in the encoder), e.g. a
    video student's decoder at ``{"scfm*": 0.1, "heads": 0.1}`` while its new parts learn at the full rate. The
    first pattern that names a parameter sets its rate.
    """

    name: str = "scfnet_m3"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_weights: str | None = None      # a models.save_weights file to start from (local or s3://)
    backbone_weights: str | None = None  # ImageNet encoder weights (torchvision / timm state dict; local or s3://)
    freeze: tuple[str, ...] = ()         # parameter-name patterns that do not train (frozen_names)
    lr_mult: dict[str, float] = dataclasses.field(default_factory=dict)   # pattern -> multiple of optim.lr

    def __post_init__(self) -> None:
        from models import create_model, list_models
        if self.name not in list_models():
            raise ConfigError(f"model.name: unknown model {self.name!r}; registered: {', '.join(list_models())}")
        for pattern, mult in self.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult <= 0:
                raise ConfigError(f"model.lr_mult.{pattern}: must be a finite number > 0, got {mult!r}")
        if self.freeze or self.lr_mult:
            model = create_model(self.name, **self.kwargs)
            frozen_names(model, self.freeze)
            for pattern in self.lr_mult:
                frozen_names(model, [pattern], key=f"model.lr_mult.{pattern}")


def part_lr_groups(model, groups: list[dict], lr_mult: dict[str, float], lr: float) -> list[dict]:
    """``model.lr_mult`` applied to optimizer ``groups``: each pattern's parameters leave their group for one of
    their own (``name`` ``lr_mult:PATTERN``, ``lr = m * lr``, ``lr_mult = m``), the first pattern naming a
    parameter winning; groups left empty drop out. Frozen parameters are in no group and stay out."""
    params = dict(model.named_parameters())
    owner: dict[int, str] = {}
    for pattern in lr_mult:
        for name in frozen_names(model, [pattern], key=f"model.lr_mult.{pattern}"):
            owner.setdefault(id(params[name]), pattern)
    moved: dict[str, list] = {pattern: [] for pattern in lr_mult}
    out = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in owner]
        for p in g["params"]:
            if id(p) in owner:
                moved[owner[id(p)]].append(p)
        if keep:
            out.append({**g, "params": keep})
    out += [{"name": f"lr_mult:{pattern}", "params": ps, "lr": lr * float(lr_mult[pattern]),
             "lr_mult": float(lr_mult[pattern])} for pattern, ps in moved.items() if ps]
    return out


def frozen_names(model, patterns: tuple[str, ...] | list[str], key: str = "model.freeze") -> list[str]:
    """The names of ``model``'s parameters that ``model.freeze`` (or ``model.lr_mult``) patterns name; ``key`` is
    the dotted path an error names.

    A pattern names a part by its dotted path (``backbone``, ``scfm4``, ``heads.0``) and everything under it;
    ``fnmatch`` wildcards are allowed (``scfm*``). A pattern that names no parameter is a config error that lists
    the model's top-level parts.
    """
    from fnmatch import fnmatchcase
    names = [n for n, _ in model.named_parameters()]
    hit: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{key}: entries must be non-empty strings, got {pattern!r}")
        found = [n for n in names if fnmatchcase(n, pattern) or fnmatchcase(n, pattern + ".*")]
        if not found:
            parts = sorted({n.split(".", 1)[0] for n in names})
            raise ConfigError(f"{key}: {pattern!r} names no parameter of {type(model).__name__}; its parts: "
                              f"{', '.join(parts)}")
        hit += [n for n in found if n not in hit]
    return hit


def freeze_parts(model, patterns: tuple[str, ...] | list[str]) -> int:
    """Stop the parameters ``patterns`` name from training (``requires_grad`` off, so ``param_groups`` leaves them
    out of the optimizer); returns how many tensors were frozen.

    A BatchNorm layer whose weights are all frozen also keeps its running statistics and normalises with them in
    training too (a forward pre-hook runs it as in eval): the frozen part computes exactly what it computed before,
    so the parts that do train see the features they will see at inference.
    """
    from torch import nn
    if not patterns:
        return 0
    names = set(frozen_names(model, patterns))
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            m.register_forward_pre_hook(_as_in_eval)
    return len(names)


def _as_in_eval(module, inputs) -> None:
    module.training = False


@dataclasses.dataclass(frozen=True)
class PairedSource:
    """``ROOT/images`` + ``ROOT/masks`` paired by stem (local or ``s3://``); ``limit`` keeps the first N."""

    uri: str
    limit: int | None = None
    images: str = "images"
    masks: str = "masks"


@dataclasses.dataclass(frozen=True)
class UnlabeledSource:
    """A tree of images; ``labels`` = the output of ``sodkd label`` on it (offline soft labels), or None for
    online labels from ``data.teacher``. Label keys are relative to the folder labelled, so ``uri`` must be
    the same folder (local copy or bucket) the labelling job read."""

    uri: str
    labels: str | None = None
    limit: int | None = None
    teacher_labels: str | None = None   # mode foundation: a SOD teacher's labels to fuse with (by id)


@dataclasses.dataclass(frozen=True)
class OnlineTeacherConfig:
    """A teacher run inside the training pipeline (online soft labels) and drawn in the MLflow panel.

    ``teachers``: specs of :mod:`cluster.teachers` (several = an ensemble, combined as ``ensemble`` says); empty
    = none.
    """

    teachers: tuple[str, ...] = ()
    tta: Literal["none", "hflip"] = "none"
    teacher_size: int | None = None
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)
    pool: PoolConfig = dataclasses.field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=16))

    def __post_init__(self) -> None:
        if self.teachers:
            self.ensemble.check_members(len(self.teachers))


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data and what the worker does with it.

    Attributes:
        paired: labelled sources (masks).
        unlabeled: unlabeled sources (soft labels, offline or online).
        teacher: the online teacher (needed by unlabeled sources without ``labels``).
        load_size: images and targets are decoded and resized once to this square size; each batch is then
            augmented and resized to one of ``sizes`` (KD-SCFNet: 224..352 from 352).
        sizes: the multi-scale training sizes.
        augment: the paper's augmentation (``kd.augment.AugmentConfig``).
        cache: materialise the decoded images in the object store once (epochs then skip decoding).
        shuffle_buffer: rows of the per-worker local shuffle buffer (0 = no shuffling).
        shuffle_blocks: with ``cache``, cut the cached rows into blocks of ``shuffle_block_rows`` and draw the
            blocks in a new random order every epoch (``randomize_block_order``, reseeded per execution), so
            the local buffer mixes rows from the whole dataset, not from a window of the sources' sorted order
            (folders one after another, synsets in name order). Off = the stored order, for debugging only.
        shuffle_block_rows: rows per block for ``shuffle_blocks``.
        decode_cpus: Ray CPUs per decode task (fractional keeps small machines from starving).
        decode_batch: images per decode task batch.
    """

    paired: tuple[PairedSource, ...] = ()
    unlabeled: tuple[UnlabeledSource, ...] = ()
    teacher: OnlineTeacherConfig = dataclasses.field(default_factory=OnlineTeacherConfig)
    load_size: int = 352
    sizes: tuple[int, ...] = TRAIN_SIZES
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache: bool = True
    shuffle_buffer: int = 1024
    shuffle_blocks: bool = True
    shuffle_block_rows: int = 32
    decode_cpus: float = 0.5
    decode_batch: int = 16

    def __post_init__(self) -> None:
        if self.load_size < 16:
            raise ConfigError(f"data.load_size: must be >= 16, got {self.load_size}")
        if not self.sizes or any(s < 16 for s in self.sizes):
            raise ConfigError(f"data.sizes: need one or more sizes >= 16, got {list(self.sizes)}")
        if self.decode_cpus <= 0 or self.decode_batch < 1 or self.shuffle_buffer < 0:
            raise ConfigError("data: decode_cpus > 0, decode_batch >= 1 and shuffle_buffer >= 0 are required")
        if self.shuffle_block_rows < 1:
            raise ConfigError(f"data.shuffle_block_rows: must be >= 1, got {self.shuffle_block_rows}")


@dataclasses.dataclass(frozen=True)
class ValConfig:
    """Validation each ``every`` epochs on a labelled set (rank 0): images at ``size``, scored at mask size.

    ``panel``: samples in the MLflow picture (image / teacher / prediction / mask); 0 = none.
    """

    uri: str | None = None
    limit: int | None = None
    size: int = TEST_SIZE
    every: int = 1
    batch_size: int = 8
    panel: int = 4


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """KD-SCFNet's recipe: SGD 0.9 / 5e-4, 5 warm-up epochs from 6.4e-4 to 0.064, per-iteration cosine to
    6.4e-4, the backbone at 0.1x, batch 128 (global: split evenly over the workers), 69 epochs."""

    epochs: int = 69
    batch_size: int = 128
    lr: float = 0.064
    lr_start: float = 6.4e-4
    lr_final: float = 6.4e-4
    warmup_epochs: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 0.1
    grad_clip: float | None = None
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.lr, self.lr_start, self.lr_final, self.momentum,
                                               self.weight_decay, self.backbone_lr_mult)):
            raise ConfigError("optim: lr, lr_start, lr_final, momentum, weight_decay and backbone_lr_mult "
                              "must be finite numbers")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov: needs momentum > 0")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"optim: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or self.lr_start < 0 or self.lr_final < 0:
            raise ConfigError("optim: lr must be > 0, lr_start and lr_final >= 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"optim.warmup_epochs: must be >= 0, got {self.warmup_epochs}")

    def schedule(self, steps_per_epoch: int):
        """The per-step learning rate over the whole run (``kd.schedule.WarmupCosine``)."""
        from kd.schedule import WarmupCosine
        total = steps_per_epoch * self.epochs
        return WarmupCosine(total, min(total, round(self.warmup_epochs * steps_per_epoch)), self.lr,
                            self.lr_start, self.lr_final)


@dataclasses.dataclass(frozen=True)
class ScalingSection:
    """Workers and strategy. ``num_workers: 0`` runs the loop in this process (Ray Train local mode).

    ``strategy``: ``ddp`` (DistributedDataParallel, gloo on CPU / nccl on GPU) or ``deepspeed`` (ZeRO
    ``zero_stage`` 0-2, bf16 optional; the torch SGD optimizer is handed to ``deepspeed.initialize``).
    ``torch_threads``: intra-op threads per worker; 0 = one per whole CPU of ``cpus_per_worker``.
    ``channels_last`` (on by default): image training (the image task; the video trainer keeps torch's default
    layout) runs the model and its input batches in the channels_last (NHWC) memory format, with the DDP strategy.
    Same maths, another layout: in float64 the loss and every gradient of the two layouts agree to 1e-13; in fp32
    they differ by rounding (the worst parameter by ~1e-4 of the gradient's norm on real images; in tiny random
    batches a pre-activation rounded across a ReLU / hard-swish kink can move gradients by up to a percent, in either
    layout; RESULTS ``train-layout-gradients``).
    A training step of the c = 48 ``scfnet_m3`` at 224 px, batch 16, is 1.4-1.6x faster on a 2-core AMD EPYC (one
    or two threads), 1.44x / 1.26x on a 2-core Intel Xeon (``benchmarks/train_layout.py``). Weights files and
    exports are written in the default layout either way; ``false`` keeps torch's default layout.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1
    bf16: bool = False
    torch_threads: int = 0
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"scaling.num_workers: must be >= 0, got {self.num_workers}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"scaling.zero_stage: 0, 1 or 2 (stage 3 shards the weights, which the rank-0 "
                              f"validation cannot run), got {self.zero_stage}")
        if self.strategy == "deepspeed" and self.num_workers == 0:
            raise ConfigError("scaling.strategy: deepspeed needs num_workers >= 1")
        if self.bf16 and self.strategy != "deepspeed":
            raise ConfigError("scaling.bf16: only with strategy deepspeed")

    def threads(self) -> int:
        return torch_threads(self.torch_threads, self.cpus_per_worker)

    def per_worker(self, batch_size: int) -> int:
        """The global ``optim.batch_size`` split over the workers (in process: all of it); an error when it
        does not split evenly."""
        workers = max(1, self.num_workers)
        if batch_size % workers:
            raise ConfigError(f"optim.batch_size: {batch_size} does not split evenly over {workers} workers")
        return batch_size // workers


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The run's identity and storage: ``<storage>/<name>`` holds its checkpoints (local path or s3://).

    Resubmitting the same name and storage resumes; ``max_failures`` worker-group restarts are allowed
    (-1 = unlimited); Ray keeps ``keep_checkpoints`` checkpoints (the best by val/mae) besides the latest.
    """

    name: str = "sodkd-train"
    storage: str = "runs"
    max_failures: int = 0
    keep_checkpoints: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name: a non-empty name without '/', got {self.name!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where the job writes the final (best by val/mae, else last) weights: ``<dir>/<run name>.pt`` and,
    with ``fp16``, ``<run name>.fp16.pt``. None = ``<storage>/<name>/final``.

    ``calibrate``: choose the output scale on the validation pairs (``val.uri``) before writing, as ``sodkd
    calibrate`` does (:mod:`kd.calibration`: a lower MAE for at most ``max_s_drop`` of S), and fold it into the
    files; the scale and the before / after figures go into the files' header and the MLflow run."""

    dir: str | None = None
    fp16: bool = True
    calibrate: bool = False
    max_s_drop: float = 0.005

    def __post_init__(self) -> None:
        if not self.max_s_drop >= 0:
            raise ConfigError(f"output.max_s_drop: must be >= 0, got {self.max_s_drop}")


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: at global step ``fail_at_step`` worker ``fail_rank`` exits the process
    (``os._exit``) unless ``fail_marker`` exists; it creates the marker first, so it fails only once.

    ``fail_after_s``: seconds it waits before exiting. Ray Train registers a reported checkpoint when its
    controller next polls the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), so a
    worker that dies within moments of a report can take that checkpoint with it; a test that expects the
    restart to resume from the last epoch waits a few polls, as a crash minutes later would."""

    fail_at_step: int | None = None
    fail_marker: str | None = None
    fail_rank: int = 0
    fail_after_s: float = 0.0

    def check(self, num_workers: int) -> None:
        """Errors for a fault that could not be injected safely (called by the job configs)."""
        if self.fail_at_step is None:
            return
        if num_workers == 0:
            raise ConfigError("debug.fail_at_step: needs num_workers >= 1 (it would kill this process)")
        if not self.fail_marker:
            raise ConfigError("debug.fail_marker: required with fail_at_step (so it fails only once)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training job needs; one dict of it crosses into Ray and, flattened, into MLflow.

    ``fm``: the loss weights and trust threshold of mode foundation (ignored by the other modes); ``kd``: the
    distillation loss of soft-labelled rows (mode distill, :class:`kd.step.KDLoss`); ``mask_loss``: the loss
    of rows with masks (:class:`kd.step.MaskLoss`).
    """

    mode: Mode = "supervised"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    val: ValConfig = dataclasses.field(default_factory=ValConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    scaling: ScalingSection = dataclasses.field(default_factory=ScalingSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    mlflow: TrainTracking = dataclasses.field(default_factory=TrainTracking)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    debug: DebugConfig = dataclasses.field(default_factory=DebugConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    fm: FMLossConfig = dataclasses.field(default_factory=FMLossConfig)
    kd: KDLoss = dataclasses.field(default_factory=KDLoss)
    mask_loss: MaskLoss = dataclasses.field(default_factory=MaskLoss)

    def __post_init__(self) -> None:
        d = self.data
        for i, u in enumerate(d.unlabeled):
            if u.teacher_labels is not None and self.mode != "foundation":
                raise ConfigError(f"data.unlabeled[{i}].teacher_labels: fusion is for mode foundation "
                                  f"(this is mode {self.mode})")
        if self.mode == "foundation":
            if not d.unlabeled:
                raise ConfigError("data.unlabeled: mode foundation needs a source with foundation pseudo labels")
            for i, u in enumerate(d.unlabeled):
                if u.labels is None:
                    raise ConfigError(f"data.unlabeled[{i}].labels: mode foundation trains on stored pseudo "
                                      "labels; make them with `sodkd label --teacher foundation`")
            if d.teacher.teachers:
                raise ConfigError("data.teacher.teachers: mode foundation has no online teacher "
                                  "(fuse a SOD teacher's stored labels with data.unlabeled[i].teacher_labels)")
        elif self.mode in ("teacher", "supervised"):
            if not d.paired:
                raise ConfigError(f"data.paired: mode {self.mode} trains on image/mask pairs; give at least one")
            if d.unlabeled:
                raise ConfigError(f"data.unlabeled: mode {self.mode} uses masks only; use mode distill to mix "
                                  "in unlabeled images")
        else:
            if not d.unlabeled:
                raise ConfigError("data.unlabeled: mode distill needs at least one unlabeled source")
            for i, u in enumerate(d.unlabeled):
                if u.labels is None and not d.teacher.teachers:
                    raise ConfigError(f"data.unlabeled[{i}].labels: no offline labels and no data.teacher for "
                                      "online labels")
        if self.output.calibrate and not self.val.uri:
            raise ConfigError("output.calibrate: the scale is chosen on validation pairs; set val.uri")
        self.debug.check(self.scaling.num_workers)
        self.scaling.per_worker(self.optim.batch_size)

    @property
    def per_worker_batch(self) -> int:
        return self.scaling.per_worker(self.optim.batch_size)


class RunConfig(Protocol):
    """What the run plumbing (:mod:`cluster.training.launch`, :func:`cluster.tracking.open_job_run`) reads of a
    job's config: :class:`TrainConfig` and ``cluster.training.video.VideoTrainConfig`` both are one (a frozen
    dataclass, flattened into the MLflow params)."""

    @property
    def mode(self) -> str: ...
    @property
    def model(self) -> ModelConfig: ...
    @property
    def scaling(self) -> ScalingSection: ...
    @property
    def run(self) -> RunSection: ...
    @property
    def mlflow(self) -> TrainTracking: ...
    @property
    def output(self) -> OutputConfig: ...
    @property
    def s3(self) -> S3Config: ...
    @property
    def val(self) -> Any: ...   # its ``uri`` (None: no validation) and ``size`` (the export's input size)


def load_train_config(source: Any = None, overrides: Any = None) -> TrainConfig:
    """YAML path or mapping + dotted overrides -> :class:`TrainConfig` (strict, see :mod:`kd.config`)."""
    return load_config(TrainConfig, source, overrides)
