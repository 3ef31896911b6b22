"""Certified fine-tuning: differentiable bounds, losses, schedules, training loops.

Entry points: :func:`lipverify.train.finetune.finetune` (Python) and ``lipverify finetune MODEL --data
TRAIN --eps R --out DIR`` (the command in :mod:`lipverify.cli.finetune`; ``torchrun --nproc_per_node N -m
lipverify finetune ...`` for several GPUs / machines).

May import :mod:`lipverify.graph`, :mod:`lipverify.bounds`, :mod:`lipverify.certify`,
:mod:`lipverify.importers`, :mod:`lipverify.data`, :mod:`lipverify.report` and :mod:`lipverify.models`;
never the CLI.

Modules
-------
:mod:`~lipverify.train.trainable`
    :class:`GloroBound`: the trainable GloRo view of an imported model (live Lipschitz graph, one
    persistent power-iteration vector per linear operator, differentiable margin constants).
:mod:`~lipverify.train.losses`
    GloRo cross-entropy, GloRo-TRADES, EMMA, worst-case cross-entropy; the GloRo output and prediction.
:mod:`~lipverify.train.local`
    :class:`LocalBound`: local Lipschitz bounds in the loss (Huang et al. 2021).
:mod:`~lipverify.train.schedules`
    eps ramps (linear, log, LiResNet), the TRADES weight ramp, warm-up + cosine learning rate.
:mod:`~lipverify.train.surgery`
    ReLU -> MinMax, ReLU -> ReLU with learned thresholds, last-layer normalisation.
:mod:`~lipverify.train.loop`, :mod:`~lipverify.train.checkpoint`, :mod:`~lipverify.train.distributed`
    the training loop, atomic checkpoints with exact resume, DDP.
:mod:`~lipverify.train.report`
    sound before/after evaluation of the exported model, the report, plots.
:mod:`~lipverify.train.finetune`
    the whole job: :func:`finetune`.

Soundness: everything computed during training is an estimate.  The command exports the fine-tuned
network to ONNX, re-imports it with :func:`lipverify.load` (onnxruntime fidelity check) and recomputes
every reported certificate with the sound float64 method.
"""
