"""The training machinery shared by pretraining, fine-tuning, distillation and the synthetic-language runs, one
module per role: :mod:`~sentcomp.training.steps` (losses, optimiser, the jitted train and eval steps, validation
losses, the data plan), :mod:`~sentcomp.training.loop` (the one training loop: progress, timing, throughput, the
divergence check, metrics rows and checkpoints, with ``every(n, fn)`` hooks), :mod:`~sentcomp.training.checkpoints`
(Orbax checkpoints and resume), :mod:`~sentcomp.training.tracking` (``metrics.jsonl``, TensorBoard, W&B),
:mod:`~sentcomp.training.throughput` (model FLOPs and MFU) and :mod:`~sentcomp.training.finetune` (the FT column's
full fine-tuning). Import the role modules (``from sentcomp.training import steps, checkpoints, tracking``).
"""
