"""Training loops of the dipole-inversion networks: pre-training, adaptation, transfer learning.

One entry point, :func:`train`, driven by a :class:`TrainConfig`. Methods (``method``):

``"supervised"``
    pre-training on synthetic data (:class:`~qsmprep.dl.synth.SyntheticQSMData`):
    ``L_S = mean_M |chi_pred - chi_true|`` (``loss="l1"``, or L2), optionally plus
    ``grad_weight`` times the gradient-difference loss.
``"dsbn"`` (QSMInvNet+)
    each step a labelled synthetic batch through the ``"source"`` batch norms (``L_S``) and an
    unlabelled target batch (:class:`~qsmprep.dl.target.TargetScans`) through the ``"target"``
    ones with the data-consistency loss ``L_T = ||W (e^{i s D*chi} - e^{i s f})||^2 / ||W||^2``
    (:func:`qsmprep.dl.losses.data_consistency_loss`); ``L = L_S + lambda(t) L_T`` with
    ``lambda`` ramped up to ``lambda_max`` (sigmoid ``exp(-5 (1 - t/T)^2)`` or linear over
    ``ramp_steps``). The saved model infers with the target domain.
``"dc-finetune"`` (QSMInvNet)
    a pretrained model (``init``) fine-tuned on target scans with ``L_T``.
``"unsupervised"`` (uQSM-style)
    ``L_T`` alone from scratch, plus ``tv_weight`` times the masked mean absolute gradient
    of chi.
``"transfer"``
    supervised on target patches with a reference chi (e.g. COSMOS), from a pretrained model:
    the filter-manifold network frozen, the decoder at ``transfer_lr_decoder`` (1e-3) and
    everything else at ``transfer_lr_other`` (1e-5)
    (:meth:`~qsmprep.dl.nets.unet.UNet3d.param_groups_for_transfer`).

Optimiser AdamW with cosine annealing and warm restarts, stepped every iteration. Speed
settings (``precision``, ``channels_last``, ``threads``, ``prefetch``) change how fast a run
goes, not the batches it sees; bf16 autocast is the default on CPUs with native bfloat16.

References: Liu J, Koch KM. Non-locally encoder-decoder convolutional network for whole brain
QSM inversion. arXiv:1904.05493, 2019 (QSMInvNet). Liu J, Koch KM. Exploring domain adaption
for deep neural network trained QSM. Proc ISMRM 2021:3980; arXiv:2206.13225 (QSMInvNet+).
Chang WG, You T, Seo S, Kwak S, Han B. Domain-specific batch normalization for unsupervised
domain adaptation. CVPR 2019:7354-7362. Kang D, Dhar D, Chan AB. Incorporating side
information by adaptive convolution. NeurIPS 2017. Loshchilov I, Hutter F. Decoupled weight
decay regularization. ICLR 2019 (AdamW); SGDR: stochastic gradient descent with warm
restarts. ICLR 2017.

Outputs in ``out``: ``last.pt`` (every ``ckpt_every`` steps: weights, optimiser, scheduler, RNG
and data-generator state, so ``resume=True`` continues to the same final weights),
``train_log.csv`` (step, losses, lambda, learning rate, validation metrics through the batch
norms the model is deployed with, patches/s),
TensorBoard events in ``tb/`` when ``torch.utils.tensorboard`` imports, and the final
``<name>.pt`` (config, data description, step count, held-out metrics; its sha256 is returned
by :func:`save_checkpoint`) with the model card ``<name>.md`` beside it.

The modules of ``qsmprep.dl.train``, by job (the names below are importable from the package):

==========================  ===================================================================
module                      job
==========================  ===================================================================
:mod:`~.config`             :class:`TrainConfig`, :data:`METHODS`, :data:`ADAPTIVE_SYNTH`
:mod:`~.setup`              the model (fresh, from ``init``, a unet made a dsbn), AdamW and its
                            scheduler, the synthetic and target data sources, the target
                            subjects held out for validation
:mod:`~.steps`              what a step and a validation compute: :func:`make_inputs`, the
                            losses, :func:`lambda_schedule`, NRMSE, :func:`tkd_baseline`
:mod:`~.record`             the CSV log, TensorBoard events, hardware, peak memory, RNG state
:mod:`~.loop`               :func:`train` and the resumption of an interrupted run
:mod:`~.prefetch`           synthetic batches made ahead by a worker process
:mod:`~.bench`              the training throughput, :func:`benchmark`, and
                            :func:`~.bench.compare` of two settings
==========================  ===================================================================
"""

from __future__ import annotations

from qsmprep.dl.train.bench import benchmark
from qsmprep.dl.train.config import ADAPTIVE_SYNTH as ADAPTIVE_SYNTH
from qsmprep.dl.train.config import METHODS, TrainConfig
from qsmprep.dl.train.loop import train
from qsmprep.dl.train.setup import _optimizer as _optimizer  # tests/dl/test_dl_train.py
from qsmprep.dl.train.steps import lambda_schedule, make_inputs
from qsmprep.dl.train.steps import tkd_baseline as tkd_baseline

__all__ = [
    "METHODS",
    "TrainConfig",
    "benchmark",
    "lambda_schedule",
    "make_inputs",
    "train",
]
