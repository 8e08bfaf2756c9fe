"""Data-parallel RL under ``torchrun``: what keeps the ranks' agents alike besides the optimizer.

``scripts/train.py`` uses these when a process group of several ranks is up (``acktr_kfe.distributed``); each is a
no-op otherwise. The Kronecker optimizer averages the gradients and the curvature statistics, and the
:class:`~agents.policies.KroneckerActorCriticPolicy` combines its running statistics across ranks; here:

- :data:`RANK_SEED_STRIDE` and :func:`rank_seed`: rank ``r`` seeds its environments and action sampling with
  ``seed + 1000 r`` (rank 0's are those of a single-process run);
- :func:`start_alike`: every rank starts from rank 0's policy (parameters, buffers and the calibration);
- :class:`SynchronizedNormalization`: a callback that combines the VecNormalize statistics after each rollout.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.running_mean_std import RunningMeanStd

from acktr_kfe import distributed

RANK_SEED_STRIDE = 1000


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of rank ``rank`` (default: this process's) for a run seeded with ``seed``."""
    return seed + RANK_SEED_STRIDE * (distributed.rank() if rank is None else rank)


def start_alike(model: Any) -> None:
    """Give every rank rank 0's policy parameters and buffers (one broadcast), and the calibration read from them."""
    if not distributed.is_active():
        return
    state = [tensor for tensor in model.policy.state_dict().values() if isinstance(tensor, torch.Tensor)]
    distributed.broadcast_from_owners([state], [0], what="the initial policy")
    # The calibration and the observed-statistics flags live on the host too: read them from the new buffers, or a
    # resumed run's followers would step with fresh radii while rank 0 steps with its calibrated ones.
    if hasattr(model.policy, "restore_host_state"):
        model.policy.restore_host_state()


def combine_running_statistics(statistics: list[RunningMeanStd]) -> None:
    """Replace each ``RunningMeanStd`` by its combination over the ranks: the means and second moments averaged
    (every rank has seen as many samples), in one all-reduce."""
    if not distributed.is_active() or not statistics:
        return
    tensors = []
    for stats in statistics:
        mean = np.asarray(stats.mean, dtype=np.float64)
        tensors += [torch.tensor(mean), torch.tensor(np.asarray(stats.var, dtype=np.float64) + np.square(mean))]
    distributed.all_reduce_mean(tensors, what="VecNormalize statistics")
    for index, stats in enumerate(statistics):
        mean, second = tensors[2 * index].numpy(), tensors[2 * index + 1].numpy()
        stats.mean = mean.reshape(np.shape(stats.mean))
        stats.var = np.maximum(second - np.square(mean), 0.0).reshape(np.shape(stats.var))


class SynchronizedNormalization(BaseCallback):
    """After each rollout, every rank's VecNormalize statistics (observations, per key for ``Dict`` spaces, and
    returns) become their combination over the ranks, so that all ranks normalize alike."""

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        normalize = self.model.get_vec_normalize_env()
        if normalize is None:
            return
        observations = normalize.obs_rms
        statistics = list(observations.values()) if isinstance(observations, dict) else [observations]
        combine_running_statistics([*statistics, normalize.ret_rms])
