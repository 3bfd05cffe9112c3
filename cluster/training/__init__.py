"""The training core on Ray Train: teachers, the supervised-only (FS) student, the distilled (KD) student, the
foundation-label student and the video student -- one loop, and a task per kind of job that says what a batch
is, its loss and its validation.

The image job's ``mode`` and data sources decide what it learns from::

    teacher     a teacher (scfnet_r50 / r18) on image/mask pairs: soft dice + boundary dice (KD-SCFNet)
    supervised  the student (scfnet_m3) on the same pairs and loss: the paper's FS baseline
    distill     the student on unlabeled images with a teacher's soft labels: soft dice to sigmoid(teacher
                out2) on all four side outputs; labelled pairs may be mixed in (they keep the mask loss)
    foundation  a student (dedecoder_m3) on foundation-model pseudo masks and their per-pixel confidence:
                BCE + partial BCE (trusted pixels) + IoU per side output, + edge BCE (``fm`` weights,
                :mod:`cluster.training.foundation`); labelled pairs may be mixed in (confidence 1 everywhere)

Modules, along the way a run goes::

    sections     the config sections (model, data, val, optim, scaling, run, output, debug) and TrainConfig
    data         the image input pipeline on Ray Data (paired, offline and online soft labels)
    image        the image task (ImageTask): batch, loss, validation, picture panel; the starting weights
    video        the video task (VideoTask): its config, clips, loss, streaming validation; its driver
    foundation   the foundation mode's data: pseudo mask and confidence maps (fused with a SOD teacher's
                 label), the shard check, and load_samples for reading a set into memory
    loop         the one worker loop (epochs, lr, step, validation, best, checkpoint, report) and Task
    checkpoint   one checkpoint layout: save, persist in process, restore (each worker from its own copy)
    launch       the driver every task shares: MLflow run, TorchTrainer, failure handling, final weights
                 and the logged model (train_and_export); the image job's run_training
"""
