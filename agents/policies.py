"""The Kronecker-preconditioned actor-critic policy: ACKTR's policy, and a plug-in for SB3's own A2C and PPO.

    from stable_baselines3 import PPO
    from agents import KroneckerActorCriticPolicy, ValueTargetScale

    model = PPO(KroneckerActorCriticPolicy, "CartPole-v1")  # SB3's own hyperparameters
    model.learn(50_000, callback=ValueTargetScale())

The policy owns everything that makes an update a trust-region natural-gradient step, so that :class:`agents.ACKTR`
is a thin SB3 algorithm over it, as SB3's A2C is over ``ActorCriticPolicy``:

- the preconditioner: :class:`acktr_kfe.EKFAC` (or K-FAC) in Fisher mode, as ``policy.optimizer``;
- the curvature pass: whenever the algorithm evaluates actions with gradients enabled (once per A2C or ACKTR
  update, once per PPO minibatch), the Fisher of the policy at actions *sampled from the current policy*, plus the
  Gauss-Newton matrix of the critic, so the curvature never comes from the advantage-weighted loss;
- the trust regions and their calibration (:mod:`agents.kl_calibration`), measured after every optimizer step;
- the value scale: a running root mean square ``sigma`` of the value targets (fed by
  :meth:`KroneckerActorCriticPolicy.observe_value_targets`). The critic's head predicts the value in units of
  ``sigma`` (PopArt-style, van Hasselt et al. 2016: the head is rescaled when ``sigma`` moves so its outputs stay
  the same); the critic is read as a Gaussian of standard deviation ``sigma / vf_fisher_coef``, so ``vf_max_kl``
  is a KL in nats that means the same at every reward scale; and the value loss's gradient reaches the network
  divided by ``sigma**2``, as if the loss were taken on targets divided by ``sigma``.

- the observation scale (``normalize_observations``, flat ``Box`` observations and the flat ``Box`` entries of
  ``Dict`` ones): the running mean and
  variance of the observations of every rollout, which the policy subtracts and divides by before its layers (as
  SB3's VecNormalize, inside the policy and saved with it), so the network's inputs do not depend on the
  observation's units either.

ACKTR feeds each rollout to the policy itself (:meth:`KroneckerActorCriticPolicy.observe_rollout`). Under SB3's A2C
and PPO, pass ``callback=ValueTargetScale()`` to ``learn`` to do the same. Without it the policy warns once, ``sigma``
stays 1, the observations pass unnormalized, and the trust region that holds the critic is off (a radius in units of
``sigma`` would act in reward units; with shared layers that is the joint region, which then bounds neither).
SB3's gradient-norm clipping acts on the raw gradient before ``optimizer.step()`` preconditions it, so it scales the
natural-gradient step uniformly instead of undoing it.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch.nn import functional as F

import acktr_kfe
from acktr_kfe import distributed
from acktr_kfe.trust_region import is_positive_int

from .kl_calibration import (
    ActorCriticTrustRegions,
    actor_critic_forward,
    check_backtrack,
    check_coefficient,
    check_state_kl_bound,
    detached,
    state_kls,
)

# Per-example Fisher of a Gaussian's log standard deviation, per action dimension: E[(z^2 - 1)^2] = 2.
GAUSSIAN_LOG_STD_FISHER = 2.0
# Running mean of the squared value targets: decay per observed rollout (bias-corrected, so the first rollout
# sets the scale), and the smallest scale (all-zero targets).
VALUE_SCALE_DECAY = 0.9
MIN_VALUE_SCALE = 1e-6
# ACKTR's advantage scale: at or above the run's mean return, the running spread of the value targets is held at
# least at this fraction of their spread over the whole run. A learning run's running spread stays mostly within
# 1-3 times below the whole run's (HalfCheetah-v5, Hopper-v5, Pendulum-v1); a good policy's constant returns take
# it 10-100 times below (InvertedPendulum-v5 at 1000), which is what the floor is for (docs/ACKTR.md, "A floor
# from the whole run").
WHOLE_RUN_SPREAD_FLOOR = 0.25
# ACKTR's default normalize_advantage="capped": the running spread of the returns, at most this many times the
# advantages' own running root mean square, so that the divided advantages keep a running RMS of at least 1/3 where
# the critic explains the returns well (explained variance above about 0.9) and the floor does not bind; there the
# spread alone shrank Hopper-v5's steps to a KL of 1e-7 per update and stalled the run. Its floor is scaled by the
# share of recent episodes cut by their time limit: the floor is for a policy whose episodes run to the limit, not
# for one whose episodes all end alike by failing (Hopper-v5 stuck at a return of 280). docs/ACKTR.md, "Capped".
CAPPED_SPREAD_FACTOR = 3.0
# Observation normalization: normalized observations are clipped to this range (as SB3's VecNormalize), and a
# variance below the floor is taken as the floor (a constant observation component).
OBSERVATION_CLIP = 10.0
MIN_OBSERVATION_VARIANCE = 1e-8
# The bound on the policy's KL at states of earlier rollouts (``state_kl_bound``): how many of those states the
# uniform reservoir keeps.
STATE_RESERVOIR_SIZE = 4096

# The preconditioner's settings (preconditioner_kwargs override them). The step length: under SB3's A2C and PPO,
# whose learning rates are Adam's and RMSprop's, each layer moves along its preconditioned direction by the length
# of Adam's step at that learning rate (``step_norm="adam"``, learning-rate grafting); ACKTR, whose learning rate is
# the natural-gradient step size of the paper, sets ``step_norm="natural"`` (ACKTR_PRECONDITIONER_DEFAULTS). With
# SB3's own defaults on CartPole-v1 (50k steps, seeds 0-2) grafting took A2C to 475 in 12.7k-16.8k steps where the
# natural step at A2C's 7e-4 reached it on one seed of three (20.2k steps), and PPO in 14.9k-18.7k steps against
# 21.2k-30.8k (docs/ACKTR.md).
PRECONDITIONER_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "damping": 0.1,
    "damping_scaling": "absolute",
    "step_norm": "adam",
    "factor_decay": 0.95,
    "factor_update_interval": 1,
    "eigen_update_interval": 10,
}
ACKTR_PRECONDITIONER_DEFAULTS: dict[str, Any] = {"step_norm": "natural"}
# Further settings of one registered preconditioner (by name), on top of PRECONDITIONER_DEFAULTS.
PRECONDITIONER_NAME_DEFAULTS: dict[str, dict[str, Any]] = {
    "ekfac": {"scale_update_interval": 1},
    "kfac": {"damping_mode": "eigen"},
}


def _is_empty_or_scalar(value: Any) -> bool:
    return isinstance(value, th.Tensor) and (value.numel() == 0 or value.dim() == 0)


def fold_decayed(buffer: th.Tensor, value: th.Tensor) -> None:
    """``buffer <- decay * buffer + (1 - decay) * value`` in place (decay :data:`VALUE_SCALE_DECAY` per rollout),
    ``value`` moved to the buffer's device first."""
    buffer.mul_(VALUE_SCALE_DECAY).add_(value.to(buffer.device) * (1 - VALUE_SCALE_DECAY))


def fold_running_mean(moments: th.Tensor, value: th.Tensor) -> None:
    """Fold one rollout's ``value`` into ``moments = [decayed sum, decayed weight]`` (decay
    :data:`VALUE_SCALE_DECAY` per rollout); ``sum / weight`` is then the bias-corrected running mean."""
    fold_decayed(moments, th.stack([value.to(th.float64).cpu(), th.ones((), dtype=th.float64)]))


def preconditioner_names() -> tuple[str, ...]:
    """The preconditioners the policy can be built with: every name registered with
    :func:`acktr_kfe.register_preconditioner` (``"kfac"``, ``"ekfac"`` and any the user added)."""
    return acktr_kfe.available_preconditioners()


def check_curvature(curvature: Any) -> None:
    """``ValueError`` naming ``curvature`` and :data:`POLICY_CURVATURES` unless it is one of them."""
    if curvature not in POLICY_CURVATURES:
        raise ValueError(f"Invalid curvature: {curvature!r}. Valid values: {', '.join(POLICY_CURVATURES)}")


def check_preconditioner(name: Any) -> None:
    """``ValueError`` naming ``name`` and the registered preconditioners unless it is one of them."""
    acktr_kfe.preconditioner_class(name)


# The policy's curvature sources: the Fisher at actions sampled from the policy (ACKTR's), or iEF at the taken
# actions (Wu et al. 2024).
POLICY_CURVATURES = ("fisher", "ief")


def ief_output_grad_norms(distribution: Distribution, actions: th.Tensor) -> th.Tensor:
    """Per-example ``||d(-log pi(a_n | s_n)) / d z_n||`` at the action network's outputs ``z_n``, shape ``(N,)``:
    ``||softmax(z_n) - onehot(a_n)||`` for a categorical policy, ``||(a_n - mu_n) / sigma^2||`` at a diagonal
    Gaussian's mean. ``ValueError`` for other action distributions."""
    inner = distribution.distribution
    if isinstance(inner, th.distributions.Categorical):
        grad = inner.probs - F.one_hot(actions.long().flatten(), inner.probs.shape[-1]).to(inner.probs.dtype)
    elif isinstance(inner, th.distributions.Normal):
        grad = (actions.reshape(inner.loc.shape) - inner.loc) / inner.scale.square()
    else:
        raise ValueError(
            f"curvature='ief' supports Discrete and Box action spaces (categorical and Gaussian policies), not "
            f"{type(distribution).__name__}; use curvature='fisher'"
        )
    return grad.detach().reshape(grad.shape[0], -1).norm(dim=1)


def log_std_fisher_diagonals(policy: ActorCriticPolicy) -> dict[th.Tensor, float]:
    """``{log_std: 2}`` for a diagonal Gaussian policy with a state-independent ``log_std``, else ``{}``.

    No layer owns ``log_std``, so the Kronecker factors do not cover it; its exact per-example Fisher is known.
    """
    log_std = getattr(policy, "log_std", None)
    if isinstance(policy.action_dist, DiagGaussianDistribution) and isinstance(log_std, th.nn.Parameter):
        return {log_std: GAUSSIAN_LOG_STD_FISHER}
    return {}


def curvature_loss(distribution: Distribution, values: th.Tensor, vf_fisher_coef: float) -> th.Tensor:
    """The loss whose backward feeds ACKTR's curvature: the policy's Fisher at actions sampled from it, plus
    ``vf_fisher_coef`` times the critic's Gauss-Newton loss (an output gradient of 1 per state) on ``values`` in
    units of the value scale."""
    sampled = distribution.sample().detach()
    loss = -distribution.log_prob(sampled).mean()
    if vf_fisher_coef:
        loss = loss + vf_fisher_coef * acktr_kfe.gauss_newton_loss(values)
    return loss


def merge_moments(count: Any, mean: Any, var: Any, batch_count: Any, batch_mean: Any, batch_var: Any) -> tuple:
    """Count, mean and (biased) variance of the union of two samples, from each one's (Chan et al.'s parallel
    merge; floats or tensors)."""
    total = count + batch_count
    delta = batch_mean - mean
    m2 = var * count + batch_var * batch_count + delta * delta * count * batch_count / total
    return total, mean + delta * batch_count / total, m2 / total


def _scaled_values(normalized: th.Tensor, scale: th.Tensor) -> th.Tensor:
    """``scale * normalized`` in the forward pass; in the backward pass the gradient is divided by ``scale``
    instead of multiplied by it, so a loss on the values in reward units trains the head as the same loss on
    targets divided by ``scale`` would (the critic's gradient does not depend on the reward scale)."""
    return normalized.detach() * scale + (normalized - normalized.detach()) / scale


class KroneckerActorCriticPolicy(ActorCriticPolicy):
    """SB3's ``ActorCriticPolicy`` preconditioned by EKFAC or K-FAC, with ACKTR's trust regions and a
    reward-scale-free critic (see the module docstring).

    Trust regions (:mod:`agents.kl_calibration`): with separate actor and critic networks (SB3's default
    ``MlpPolicy`` layout) ``max_kl`` bounds the policy's KL and ``vf_max_kl`` the critic's, with shared layers one
    joint region is bounded by ``max_kl``; each bounds the momentum step actually taken. Both are KLs in nats per
    optimizer step: the critic's Gaussian has standard deviation ``sigma / vf_fisher_coef``, ``sigma`` the running
    root mean square of the value targets, so the value may move by about ``sqrt(2 vf_max_kl) sigma /
    vf_fisher_coef`` per step whatever the reward scale. After every optimizer step the policy measures the KL on
    the minibatch it just evaluated (one forward pass) and, with ``calibrate_kl``, divides the next radius by the
    running bias of the quadratic model (for discrete actions, a bias below 1 leaves the radius at its target).
    The last measurement is in ``last_measured_kl`` and ``last_measured_vf_kl``.

    State: the calibration (buffer ``kl_log_bias``), the value scale and spread (buffers ``value_scale``,
    ``value_target_moments``, ``value_target_mean``, ``value_target_stats``), the advantages' running scale
    (``advantage_moments``), the share of episodes cut by their time limit (``episode_end_moments``) and the
    observation statistics (``observation_mean``, ``observation_var``, ``observation_count``) are saved and loaded
    with the parameters; the preconditioner's statistics with ``policy.optimizer`` (SB3 saves both).

    Args:
        preconditioner: ``"ekfac"`` (default) or ``"kfac"``.
        preconditioner_kwargs: keyword arguments of :class:`acktr_kfe.EKFAC` / :class:`acktr_kfe.KFAC` that
            override :data:`PRECONDITIONER_DEFAULTS` (momentum 0.9, damping 0.1 absolute, factors every step,
            eigenbasis every 10 steps; EKFAC's scale every step, K-FAC's eigen damping; ``step_norm="adam"``: each
            layer steps along its preconditioned direction by the length of Adam's step at the algorithm's
            learning rate, so SB3's own learning rates apply; ACKTR sets ``"natural"``, the paper's step). The
            learning rate comes from the algorithm; the trust regions from the arguments below.
        max_kl: radius of the policy's trust region (KL per optimizer step); ``None`` disables it.
        vf_max_kl: radius of a separate critic's region (KL of its Gaussian, see above); ``None`` disables it.
        calibrate_kl: calibrate the radii against the measured KL.
        kl_backtrack: shrink a region's step whose measured KL exceeds ``kl_backtrack`` times its target (``max_kl``
            or ``vf_max_kl``, before calibration) back to the target along its own direction (momentum buffer
            included), and measure again; ``None``: keep every step. The factors of the last optimizer step (under
            PPO, its last minibatch) are in ``last_backtrack_factors``. Under the grafted step (``step_norm="adam"``)
            the next step is brought back to Adam's length whatever the buffer, so shrinking the buffer only lowers
            momentum's share of its direction; measured with ACKTR's natural step only.
        state_kl_bound: bound the policy's KL at every state kept from earlier rollouts by ``state_kl_bound`` times
            ``max_kl``: after each optimizer step the policy (the joint region with shared layers) is evaluated at a
            uniform reservoir of ``state_reservoir_size`` states from every rollout before the current one (raw
            observations, flat ``Box`` spaces only; filled by :meth:`observe_rollout`), and where the largest KL
            exceeds the bound the step is shrunk along its own direction by ``sqrt(bound / largest)``, once
            (momentum buffer included). ``max_kl`` bounds the KL averaged over the batch, where rare states weigh
            little. The last step's largest KL and factor are in ``last_state_kl`` and ``last_state_kl_factor``.
            The reservoir is saved with the parameters (buffers ``state_reservoir*``; none without the bound).
            ``None``: no bound.
        state_reservoir_size: how many earlier states the bound is checked at.
        vf_fisher_coef: weight of the critic's Gauss-Newton loss in the curvature pass (the critic's Gaussian has
            standard deviation ``sigma / vf_fisher_coef``).
        normalize_observations: normalize flat ``Box`` observations by their running mean and variance (updated
            by :meth:`observe_rollout`), and in ``Dict`` observations their flat ``Box`` entries (one vector of
            statistics over them, so a ``Dict`` with one vector entry is normalized as the flat observation);
            images are left alone (SB3's extractors scale them). With ACKTR's defaults and
            raw observations it took CartPole-v1 to the threshold in 22.7k steps instead of 41.7k (median of seeds
            0-2).
        Other arguments: as ``ActorCriticPolicy`` (``optimizer_class`` and ``optimizer_kwargs`` are ignored).
    """

    def __init__(
        self,
        *args: Any,
        preconditioner: str = "ekfac",
        preconditioner_kwargs: dict[str, Any] | None = None,
        max_kl: float | None = 0.001,
        vf_max_kl: float | None = 0.003,
        calibrate_kl: bool = True,
        vf_fisher_coef: float = 1.0,
        normalize_observations: bool = True,
        curvature: str = "fisher",
        kl_backtrack: float | None = None,
        state_kl_bound: float | None = None,
        state_reservoir_size: int = STATE_RESERVOIR_SIZE,
        **kwargs: Any,
    ) -> None:
        check_preconditioner(preconditioner)
        check_curvature(curvature)
        check_backtrack(kl_backtrack)
        check_state_kl_bound(state_kl_bound)
        if not is_positive_int(state_reservoir_size):
            raise ValueError(f"Invalid state_reservoir_size: {state_reservoir_size!r} (an integer >= 1)")
        check_coefficient(vf_fisher_coef, "vf_fisher_coef")
        if not isinstance(calibrate_kl, bool | np.bool_):
            raise ValueError(f"Invalid calibrate_kl: {calibrate_kl!r} (True or False)")
        reserved = sorted({"lr", "max_kl", "trust_regions", "curvature"} & set(preconditioner_kwargs or {}))
        if reserved:
            raise ValueError(
                f"preconditioner_kwargs may not set {reserved}: the learning rate comes from the algorithm, the "
                "trust regions from max_kl / vf_max_kl, and the curvature from the policy's curvature argument"
            )
        self.preconditioner = preconditioner
        self.preconditioner_kwargs = dict(preconditioner_kwargs or {})
        self.max_kl, self.vf_max_kl, self.calibrate_kl = max_kl, vf_max_kl, calibrate_kl
        self.vf_fisher_coef = vf_fisher_coef
        self.normalize_observations = normalize_observations
        self.curvature = curvature
        self.kl_backtrack = kl_backtrack
        self.state_kl_bound, self.state_reservoir_size = state_kl_bound, state_reservoir_size
        self.last_measured_kl = self.last_measured_vf_kl = float("nan")
        self.last_backtrack_factors: list[float] = []
        self.last_state_kl = float("nan")
        self.last_state_kl_factor = 1.0
        self._reservoir_before: Any = None
        self._pending: tuple[th.Tensor, Any, th.Tensor] | None = None
        self._step_start: list[list[th.Tensor] | None] | None = None
        self._skipped_before_step = 0  # the optimizer's skipped-step count when its current step began
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        # A Dict observation space's flat (non-image) Box entries and their flattened sizes, found once (the forward
        # passes read them); none for other spaces.
        space = self.observation_space
        self._dict_vector_entries: tuple[tuple[str, int], ...] = (
            tuple(
                (key, math.prod(sub.shape))
                for key, sub in space.spaces.items()
                if isinstance(sub, spaces.Box) and not self._is_image(sub)
            )
            if isinstance(space, spaces.Dict)
            else ()
        )
        # The running log(measured / predicted KL) per region, saved with the parameters (padded to two regions).
        self.register_buffer("kl_log_bias", th.zeros(2, dtype=th.float64))
        # sigma, and the running (bias-uncorrected) mean of the squared value targets with its total weight.
        self.register_buffer("value_scale", th.ones((), dtype=th.float32))
        self.register_buffer("value_target_moments", th.zeros(2, dtype=th.float64))
        # The running (bias-uncorrected) mean of the value targets, with the weights of value_target_moments.
        self.register_buffer("value_target_mean", th.zeros((), dtype=th.float64))
        # Count, mean and (biased) variance of every value target observed so far.
        self.register_buffer("value_target_stats", th.tensor([0.0, 0.0, 1.0], dtype=th.float64))
        # The running (bias-uncorrected) mean of the squared advantages, with its total weight.
        self.register_buffer("advantage_moments", th.zeros(2, dtype=th.float64))
        # Decayed counts (per rollout) of the episodes that ended at their time limit and of all that ended.
        self.register_buffer("episode_end_moments", th.zeros(2, dtype=th.float64))
        shape = self._observation_statistics_shape
        self.register_buffer("observation_mean", th.zeros(shape, dtype=th.float64))
        self.register_buffer("observation_var", th.ones(shape, dtype=th.float64))
        self.register_buffer("observation_count", th.zeros((), dtype=th.float64))
        self._observations_seen = False  # observation_count > 0, kept on the host (no device sync per forward)
        self._value_targets_seen = False  # value_target_moments[1] > 0, on the host likewise
        self._warned_unobserved = False
        # States of earlier rollouts (raw observations) for state_kl_bound, and how many states were offered to it.
        # Only with the bound: without it the policy's state holds floating-point tensors with elements only, as
        # SB3's own save/load tests (which perturb every entry with rand_like) expect of a policy.
        if self._keeps_state_reservoir:
            shape = self.observation_space.shape
            self.register_buffer("state_reservoir", th.zeros((self.state_reservoir_size, *shape), dtype=th.float32))
            self.register_buffer("state_reservoir_seen", th.zeros((), dtype=th.int64))
            # The last rollout's states, which join the reservoir when the next rollout is observed (none: 0 rows).
            self.register_buffer("state_reservoir_pending", th.zeros((0, *shape), dtype=th.float32))
            self.register_buffer("state_reservoir_seed", th.tensor(th.initial_seed() % 2**62, dtype=th.int64))
        # Discrete policies can saturate for good, so their calibration never enlarges a radius (docs/ACKTR.md,
        # "Calibration that only shrinks the radius"); Gaussian policies keep the enlargement.
        self.trust_regions = ActorCriticTrustRegions(
            self,
            self.max_kl,
            self.vf_max_kl,
            self.vf_fisher_coef,
            self.calibrate_kl,
            enlarge=isinstance(self.action_space, spaces.Box),
            backtrack=self.kl_backtrack,
        )
        extra = PRECONDITIONER_NAME_DEFAULTS.get(self.preconditioner, {})
        options = {
            **PRECONDITIONER_DEFAULTS,
            **extra,
            "trust_region_mode": "step",
            **self.preconditioner_kwargs,
            "lr": lr_schedule(1),
            "curvature": self.curvature,
            "trust_regions": self.trust_regions.regions,
        }
        options.setdefault("fisher_diagonals", log_std_fisher_diagonals(self))
        cls = acktr_kfe.preconditioner_class(self.preconditioner)
        self.optimizer = cls(self, **options)
        # observe_value_targets rescales the critic's head with the value scale: not a divergence to warn about.
        self.optimizer.exempt_from_growth_warning(self.value_net.parameters())
        self.optimizer.register_step_pre_hook(self._before_step)
        self.optimizer.register_step_post_hook(self._after_step)
        # The critic starts at zero, so the first rollout's advantages are the returns themselves, in whatever units
        # the rewards have (the trust regions above were found with the head as SB3 initialized it: a zero head
        # would hide the critic's other layers from the probe).
        with th.no_grad():
            for param in self.value_net.parameters():
                param.zero_()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            preconditioner=self.preconditioner,
            preconditioner_kwargs=self.preconditioner_kwargs,
            max_kl=self.max_kl,
            vf_max_kl=self.vf_max_kl,
            calibrate_kl=self.calibrate_kl,
            vf_fisher_coef=self.vf_fisher_coef,
            normalize_observations=self.normalize_observations,
            curvature=self.curvature,
            kl_backtrack=self.kl_backtrack,
            state_kl_bound=self.state_kl_bound,
            state_reservoir_size=self.state_reservoir_size,
        )
        return data

    @property
    def _normalizes_observations(self) -> bool:
        space = self.observation_space
        if isinstance(space, spaces.Dict):
            return bool(self._normalized_keys)
        return self.normalize_observations and isinstance(space, spaces.Box) and not self._is_image(space)

    def _is_image(self, space: spaces.Space) -> bool:
        """Whether SB3's extractors take ``space`` as an image (uint8 in [0, 255], or float with
        ``features_extractor_kwargs={"normalized_image": True}``); images are left to them, not normalized."""
        normalized = bool((self.features_extractor_kwargs or {}).get("normalized_image", False))
        return is_image_space(space, check_channels=False, normalized_image=normalized)

    @property
    def _normalized_keys(self) -> tuple[str, ...]:
        """The keys of a ``Dict`` observation space that are normalized: its flat (non-image) ``Box`` entries."""
        return tuple(key for key, _ in self._dict_vector_entries) if self.normalize_observations else ()

    @property
    def _observation_statistics_shape(self) -> tuple[int, ...]:
        """The shape of the observation statistics: the observation's, for ``Dict`` observations one vector over the
        normalized keys' flattened entries (in the space's order), ``()`` where nothing is normalized."""
        if not self._normalizes_observations:
            return ()
        if isinstance(self.observation_space, spaces.Dict):
            return (sum(size for _, size in self._dict_vector_entries),)
        return self.observation_space.shape

    def _flat_dict_observations(self, obs: Mapping[str, Any]) -> th.Tensor:
        """The normalized keys of a ``Dict`` observation, each flattened over its own dimensions and concatenated
        along the last one (leading batch dimensions kept), in float64."""
        parts = []
        for key in self._normalized_keys:
            value = th.as_tensor(obs[key])
            key_dims = len(self.observation_space[key].shape)
            parts.append(value.double().reshape(*value.shape[: value.dim() - key_dims], -1))
        return th.cat(parts, dim=-1)

    @property
    def _keeps_state_reservoir(self) -> bool:
        space = self.observation_space
        return self.state_kl_bound is not None and isinstance(space, spaces.Box) and not self._is_image(space)

    # -- what a rollout teaches the policy -----------------------------------------------------------------------

    def observe_rollout(self, rollout_buffer: RolloutBuffer) -> None:
        """Fold a collected rollout into the policy's running statistics before it is trained on: the value
        targets (returns) into the value scale, the advantages into their running scale, the observations into
        the observation normalization; with
        ``state_kl_bound``, the previous rollout's states into the reservoir (the one about to be trained on joins
        it at the next rollout: its own states are bounded on average by ``max_kl``)."""
        self.observe_value_targets(rollout_buffer.returns)
        self.observe_advantages(rollout_buffer.advantages)
        if self._normalizes_observations:
            self.observe_observations(rollout_buffer.observations)
        if self._keeps_state_reservoir:
            if len(self.state_reservoir_pending):
                self.observe_states(self.state_reservoir_pending)
            observations = th.as_tensor(np.asarray(rollout_buffer.observations), dtype=th.float32)
            self.state_reservoir_pending = observations.reshape(-1, *self.state_reservoir.shape[1:]).to(
                self.state_reservoir.device, copy=True
            )

    @th.no_grad()
    def observe_states(self, observations: th.Tensor | np.ndarray) -> None:
        """Offer a batch of raw observations to the reservoir of ``state_kl_bound``: after ``n`` states were offered,
        each of them is in it with probability ``min(1, size / n)`` (reservoir sampling, Vitter's algorithm R)."""
        if not self._keeps_state_reservoir:
            raise ValueError(
                "this policy keeps no state reservoir: it is built with state_kl_bound (flat Box observations only)"
            )
        size = self.state_reservoir.shape[0]
        batch = th.as_tensor(observations, dtype=th.float32).reshape(-1, *self.state_reservoir.shape[1:])
        seen = int(self.state_reservoir_seen)
        # The draws depend on the policy's seed and the count only (not on torch's global stream, which they leave
        # alone), so a saved and loaded policy keeps the same states.
        generator = th.Generator().manual_seed((int(self.state_reservoir_seed) + seen) % 2**63)
        order = th.arange(seen, seen + batch.shape[0], dtype=th.float64)
        # The state numbered t (from 0) takes slot t while the reservoir fills, then a uniform slot in [0, t] if < size.
        slots = (th.rand(batch.shape[0], generator=generator, dtype=th.float64) * (order + 1)).long()
        slots = th.where(order < size, order.long(), slots)
        keep = (slots < size).nonzero().squeeze(1).tolist()
        latest = {int(slots[index]): index for index in keep}  # a slot drawn twice keeps the later state
        if latest:
            self.state_reservoir[th.tensor(list(latest))] = batch[th.tensor(list(latest.values()))].to(
                self.state_reservoir.device
            )
        self.state_reservoir_seen.fill_(seen + batch.shape[0])

    @th.no_grad()
    def observe_observations(self, observations: th.Tensor | np.ndarray | Mapping[str, Any]) -> None:
        """Merge a batch of observations (leading dimensions are batch; for ``Dict`` observations a mapping of such
        batches, of which the normalized keys count) into the running mean and variance."""
        if isinstance(observations, Mapping):  # Dict observations: their normalized keys, flattened
            batch = self._flat_dict_observations(observations)
        else:
            batch = observations if isinstance(observations, th.Tensor) else th.as_tensor(np.asarray(observations))
        # On the statistics' device (the policy's): the moments are merged, and reduced over ranks, there.
        batch = batch.to(self.observation_mean.device, th.float64).reshape(-1, *self.observation_mean.shape)
        count = float(batch.shape[0])
        if count == 0:
            return
        mean, var = batch.mean(0), batch.var(0, unbiased=False)
        # Data parallel (torchrun): the moments of every rank's batch, so that all ranks normalize alike.
        mean, var, count = distributed.combine_moments(mean, var, count, what="observation statistics")
        total, new_mean, new_var = merge_moments(
            self.observation_count, self.observation_mean, self.observation_var, count, mean, var
        )
        self.observation_mean.copy_(new_mean)
        self.observation_var.copy_(new_var)
        self.observation_count.copy_(total)
        self._observations_seen = True

    # -- the value scale ------------------------------------------------------------------------------------------

    @th.no_grad()
    def observe_value_targets(self, targets: th.Tensor | np.ndarray) -> float:
        """Fold a rollout's value targets (returns) into the running scale ``sigma`` and rescale the critic's head
        so that its outputs, in reward units, do not change (its momentum buffers and Adam moments with it).
        Returns ``sigma``."""
        targets = th.as_tensor(np.asarray(targets), dtype=th.float64)
        moments = self.value_target_moments
        fold_running_mean(moments, distributed.mean_over_ranks(targets.square().mean()))
        fold_decayed(self.value_target_mean, distributed.mean_over_ranks(targets.mean()))
        batch_mean, batch_var, batch_count = distributed.combine_moments(
            targets.mean(), targets.var(unbiased=False), float(targets.numel()), what="value target statistics"
        )
        merged = merge_moments(*self.value_target_stats.tolist(), batch_count, float(batch_mean), float(batch_var))
        self.value_target_stats.copy_(th.tensor(merged, dtype=th.float64))
        new_scale = max(math.sqrt(float(moments[0] / moments[1])), MIN_VALUE_SCALE)
        ratio = float(self.value_scale) / new_scale
        if not math.isfinite(ratio):
            raise ValueError(f"non-finite value targets: the value scale would become {new_scale}")
        # The head's gradients scale with its weights (the loss is taken in units of sigma), so the optimizer's
        # per-parameter state follows: the momentum buffer and Adam's first moment (the grafted step's length) by
        # ``ratio``, Adam's second moment by its square, as if they had been gathered in the new units.
        for param in self.value_net.parameters():
            param.mul_(ratio)
            state = self.optimizer.state.get(param, {})
            for key, power in (("momentum_buffer", 1), ("adam_exp_avg", 1), ("adam_exp_avg_sq", 2)):
                if (buffer := state.get(key)) is not None:
                    buffer.mul_(ratio**power)
        self.value_scale.fill_(new_scale)
        self._value_targets_seen = True
        return new_scale

    @th.no_grad()
    def observe_advantages(self, advantages: th.Tensor | np.ndarray) -> float:
        """Fold a rollout's advantages into their running root mean square (decay 0.9 per rollout, not centred),
        which ACKTR's ``normalize_advantage="running"`` divides them by. Returns the new scale."""
        advantages = th.as_tensor(np.asarray(advantages), dtype=th.float64)
        # Checked after the mean over ranks (a non-finite value carries through it): every rank raises together.
        square = distributed.mean_over_ranks(advantages.square().mean())
        if not bool(th.isfinite(square)):
            raise ValueError("non-finite advantages: the rollout's rewards or value estimates are not finite")
        fold_running_mean(self.advantage_moments, square)
        return self.advantage_scale()

    @th.no_grad()
    def observe_episode_ends(self, time_limit: int, ended: int) -> float:
        """Fold one rollout's count of ended episodes, and of those that ended at their time limit (truncated, not
        terminated), into their decayed counts (decay 0.9 per rollout, averaged over data-parallel ranks). Returns
        :meth:`time_limit_fraction`."""
        if not 0 <= time_limit <= ended:
            raise ValueError(
                f"Invalid episode ends: {time_limit} at the time limit of {ended} ended (0 <= time_limit <= ended)"
            )
        counts = th.tensor([float(time_limit), float(ended)], dtype=th.float64)
        counts = distributed.mean_over_ranks(counts, what="episode end counts")
        fold_decayed(self.episode_end_moments, counts)
        return self.time_limit_fraction()

    def time_limit_fraction(self) -> float:
        """The fraction of recent episodes that ended at their time limit (decayed counts over rollouts, decay 0.9
        per rollout), which scales the whole run's floor in :meth:`capped_divisor`: the floor then holds a
        policy whose episodes run to the time limit (nothing left to survive for), not one whose episodes end
        alike by failing. With episodes much longer than a rollout it moves in jumps: one failure among
        1000-step episodes on 128-step rollouts takes it from 1 to about 0.4. 1 before any episode ended (and for
        a policy that is not told: the plug-in)."""
        time_limit, ended = self.episode_end_moments.tolist()
        return time_limit / ended if ended > 0 else 1.0

    def advantage_scale(self) -> float:
        """The running root mean square of the advantages over rollouts (decay 0.9 per rollout, bias-corrected, not
        centred): the scale ACKTR's ``normalize_advantage="running"`` divides advantages by, so the policy's step
        has the same size at every reward scale and however well the critic fits (docs/ACKTR.md, "Divided by
        their own running scale"). 1 before any rollout was observed."""
        total, weight = self.advantage_moments.tolist()
        if weight <= 0:
            return 1.0
        return max(math.sqrt(max(total, 0.0) / weight), MIN_VALUE_SCALE)

    def capped_divisor(self) -> float:
        """The scale ACKTR's default ``normalize_advantage="capped"`` divides advantages by: the running spread of
        the returns, but at most :data:`CAPPED_SPREAD_FACTOR` times the advantages' own running root mean square
        (:meth:`advantage_scale`), then held at the whole run's floor of :meth:`value_target_spread` scaled by
        :meth:`time_limit_fraction`. Where the critic fits loosely the spread binds, as with ``"returns"``; where it
        fits well (explained variance above about 0.9) the cap binds and holds the divided advantages at a running
        RMS of 1/3, so a policy whose episodes all end alike by failing keeps moving; once a good policy's returns
        stop varying at its time limit the floor binds (the RMS may then fall below 1/3). All three are free of the
        reward's units (docs/ACKTR.md, "Capped, with the floor where episodes run to their time limit"). 1 before
        any rollout was observed."""
        parts = self._target_spread_parts()
        if parts is None:
            return 1.0
        running, floor = parts
        capped = min(running, CAPPED_SPREAD_FACTOR * self.advantage_scale())
        return max(capped, floor * self.time_limit_fraction(), MIN_VALUE_SCALE)

    def value_target_spread(self) -> float:
        """The scale ACKTR's ``normalize_advantage="returns"`` divides advantages by: the running standard
        deviation of the value targets (decay 0.9 per rollout, centred, unlike ``sigma``), held at least at
        :data:`WHOLE_RUN_SPREAD_FLOOR` times their standard deviation over the whole run so far while their
        running mean is at or above the whole run's. The running one follows the returns as the policy improves;
        the floor catches its collapse once a good policy's returns stop varying, where it would blow the
        advantages' noise up to full trust-region steps that walk the policy off what it learned. Below the run's
        mean the collapse is kept: that noise is then all that moves a policy stuck on returns that fail alike
        (docs/ACKTR.md, "A floor from the whole run"). 1 before any rollout was observed."""
        parts = self._target_spread_parts()
        if parts is None:
            return 1.0
        return max(*parts, MIN_VALUE_SCALE)

    def _target_spread_parts(self) -> tuple[float, float] | None:
        """The running spread of the value targets and the whole run's floor under it (0 below the run's mean
        return), ``None`` before any rollout."""
        moments = self._running_target_moments()
        if moments is None:
            return None
        mean, running_var = moments
        _, whole_run_mean, whole_run_var = self.value_target_stats.tolist()
        # Only at or above the run's mean return: a policy stuck below it (every episode failing alike) is moved
        # by nothing but the advantages' noise, which the collapsed running spread keeps large enough to explore.
        floor = WHOLE_RUN_SPREAD_FLOOR * math.sqrt(max(whole_run_var, 0.0)) if mean >= whole_run_mean else 0.0
        return math.sqrt(running_var), floor

    def _running_target_moments(self) -> tuple[float, float] | None:
        """The running mean and (centred) variance of the value targets, ``None`` before any rollout."""
        weight = float(self.value_target_moments[1])
        if weight <= 0:
            return None
        mean = float(self.value_target_mean) / weight
        return mean, max(float(self.value_target_moments[0]) / weight - mean * mean, 0.0)

    # -- forward passes ------------------------------------------------------------------------------------------

    def normalize_observation(self, obs: PyTorchObs) -> PyTorchObs:
        """``obs`` normalized by the running statistics (clipped to +-10), or as it is when the policy does not
        normalize observations or has observed none yet."""
        if not (self._normalizes_observations and self._observations_seen):
            return obs
        std = self.observation_var.clamp_min(MIN_OBSERVATION_VARIANCE).sqrt()

        def as_input(values: th.Tensor, like: th.Tensor) -> th.Tensor:
            return values.reshape(like.shape).to(like.dtype if like.is_floating_point() else th.float32)

        def standardized(flat: th.Tensor) -> th.Tensor:
            return ((flat.double() - self.observation_mean) / std).clamp(-OBSERVATION_CLIP, OBSERVATION_CLIP)

        if not isinstance(obs, Mapping):
            return as_input(standardized(obs), obs)
        # Dict observations: the normalized keys standardized together (one statistics vector over their flattened
        # concatenation), then each cut back out in its own shape.
        normalized = dict(obs)
        parts = standardized(self._flat_dict_observations(obs)).split(
            [size for _, size in self._dict_vector_entries], dim=-1
        )
        for (key, _), part in zip(self._dict_vector_entries, parts):
            normalized[key] = as_input(part, obs[key])
        return normalized

    # SB3 reaches the features three ways: ``self.extract_features`` (forward, and evaluate_actions through
    # actor_critic_forward) and ``BasePolicy.extract_features`` directly (predict_values, get_distribution); each
    # entry point normalizes once.

    def extract_features(  # type: ignore[override]
        self, obs: PyTorchObs, features_extractor: Any = None
    ) -> th.Tensor | tuple[th.Tensor, th.Tensor]:
        """SB3's features, of the normalized observations."""
        return super().extract_features(self.normalize_observation(obs), features_extractor)

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        """The action distribution at ``obs`` (normalized first), as SB3's."""
        return super().get_distribution(self.normalize_observation(obs))

    def forward(self, obs: th.Tensor, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Actions, values (reward units) and log-probabilities, as SB3's."""
        actions, normalized, log_prob = super().forward(obs, deterministic)
        return actions, normalized * self.value_scale, log_prob

    def predict_values(self, obs: th.Tensor) -> th.Tensor:
        """The state values ``(N, 1)`` in reward units."""
        return super().predict_values(self.normalize_observation(obs)) * self.value_scale

    def evaluate_actions(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values (reward units), log-probabilities and entropy, as SB3's; in training, also the curvature pass,
        the trust radii of the coming step, and the minibatch kept to measure the KL of that step."""
        distribution, normalized = actor_critic_forward(self, obs)
        if self.training and th.is_grad_enabled():
            if self.curvature == "ief":
                self._ief_curvature_pass(distribution, normalized, actions)
            else:
                self.optimizer.curvature_backward(
                    curvature_loss(distribution, normalized, self.vf_fisher_coef), retain_graph=True
                )
            self._pending = (obs, detached(distribution.distribution), normalized.detach())
            if not self._value_targets_seen:
                self._warn_unobserved()
            self.trust_regions.set_radii(self.optimizer, value_scale_known=self._value_targets_seen)
        values = _scaled_values(normalized, self.value_scale)
        return values, distribution.log_prob(actions), distribution.entropy()

    def _warn_unobserved(self) -> None:
        """Once per policy: it trains before any rollout was shown to it (SB3's A2C or PPO without the callback)."""
        if self._warned_unobserved:
            return
        self._warned_unobserved = True
        # Attributed to the caller of evaluate_actions (SB3's train), without the per-location registry that would
        # silence a second policy trained from the same line: each policy warns once.
        caller = sys._getframe(2)
        warnings.warn_explicit(
            "KroneckerActorCriticPolicy is training on a rollout it was not shown: pass callback=ValueTargetScale() "
            "to learn (ACKTR shows each rollout itself). Until a rollout's returns are observed the trust region "
            "that holds the critic is off (its radius is in units of the returns' scale, unknown yet) and "
            "observations are not normalized.",
            UserWarning,
            caller.f_code.co_filename,
            caller.f_lineno,
            module=caller.f_globals.get("__name__"),
            module_globals=caller.f_globals,
        )

    def critic_values(self, obs: th.Tensor) -> th.Tensor:
        """The critic's values ``(N, 1)`` in reward units, through the critic's layers only, with the gradient that
        :meth:`evaluate_actions` gives them (divided by the value scale on its way to the head)."""
        return _scaled_values(super().predict_values(self.normalize_observation(obs)), self.value_scale)

    def _ief_curvature_pass(self, distribution: Distribution, normalized: th.Tensor, actions: th.Tensor) -> None:
        """``curvature="ief"``: the policy's empirical Fisher at the *taken* actions, each example's gradient divided
        by the norm of ``d(-log pi(a_n | s_n)) / d z_n`` at the action network's outputs ``z_n`` (the logits, or the
        Gaussian's mean; Wu et al. 2024), plus the critic's Gauss-Newton pass (whose per-example output gradient is
        1, so the rescaling leaves it as it is), weighted by ``vf_fisher_coef``."""
        count = normalized.shape[0]
        # Both the recorded output gradients and these norms carry the 1 / N of the mean-reduced losses.
        self.optimizer.curvature_backward(
            -distribution.log_prob(actions).mean(),
            logit_grad_norms=ief_output_grad_norms(distribution, actions) / count,
            retain_graph=True,
        )
        if self.vf_fisher_coef > 0:
            self.optimizer.curvature_backward(
                self.vf_fisher_coef * acktr_kfe.gauss_newton_loss(normalized),
                logit_grad_norms=th.full((count,), 1.0 / count, dtype=normalized.dtype, device=normalized.device),
                retain_graph=True,
            )

    def _before_step(self, optimizer: th.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before each optimizer step: a negative learning rate from a schedule that went past the end of the run.

        SB3's progress remaining goes below 0 on a last rollout that overshoots ``total_timesteps``, where a schedule
        such as ``lambda progress: 0.25 * progress`` turns negative. ``callback=ValueTargetScale()`` holds the
        progress at 0; without it, a negative rate after earlier steps is taken as that overshoot and stepped at 0
        (with a warning) rather than raised at the end of the run, where the run's work would be lost. A negative
        rate on the first step is left to the optimizer, which refuses it as invalid."""
        regions = self.trust_regions
        self._skipped_before_step = optimizer.skipped_steps
        bounds_states = self._pending is not None and self._bounds_reservoir_states()
        if self._pending is not None and (regions.backtrack is not None or bounds_states):
            # Only the regions with a radius can be backtracked (the others are None here).
            self._step_start = [
                None if target is None else [p.detach().clone() for p in region]
                for (region, _), target in zip(regions.regions, regions.active_targets)
            ]
        self._reservoir_before = self._reservoir_distribution() if bounds_states else None
        if optimizer.steps == 0:
            return
        for group in optimizer.param_groups:
            lr = group["lr"]
            if not (isinstance(lr, float | int) and lr < 0):
                continue
            warnings.warn(
                f"learning rate {lr:.3g} < 0 after {optimizer.steps} steps: the schedule went past the end of the "
                "run (SB3's progress remaining is below 0 on a last rollout that overshoots total_timesteps); this "
                "step uses 0. Pass callback=ValueTargetScale() to learn, which holds the progress at 0.",
                RuntimeWarning,
                stacklevel=2,
            )
            group["lr"] = 0.0

    def _after_step(self, optimizer: th.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each optimizer step: the measured KL on the last evaluated minibatch, the calibration, and with
        ``kl_backtrack`` the regions whose step overshot shrunk back to their radius (measured again)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        start, self._step_start = self._step_start, None
        if optimizer.skipped_steps != self._skipped_before_step:
            # The optimizer skipped this step (a non-finite gradient or step, with its warning): nothing moved, so
            # there is no KL to measure, calibrate on or backtrack.
            self._reservoir_before = None
            self.last_measured_kl = self.last_measured_vf_kl = self.last_state_kl = float("nan")
            self.last_state_kl_factor = 1.0
            self.last_backtrack_factors = [1.0] * len(self.trust_regions.regions)
            return
        self._measure_step(*pending)
        # The calibration learns the quadratic model's error on the step it proposed, before any backtracking.
        self.trust_regions.update(self.optimizer, self.last_measured_kl, self.last_measured_vf_kl)
        factors = [1.0] * len(self.trust_regions.regions)
        if start is not None:
            factors = self.trust_regions.backtrack_factors(self.last_measured_kl, self.last_measured_vf_kl)
        self.last_backtrack_factors = factors
        if start is not None and any(factor != 1.0 for factor in factors):
            self._shrink_step(optimizer, start, factors)
            self._measure_step(*pending)
        before, self._reservoir_before = self._reservoir_before, None
        self.last_state_kl, self.last_state_kl_factor = float("nan"), 1.0
        if before is None or start is None:  # both are set before a bounded step (whose policy region has a radius)
            return
        with th.no_grad():
            largest = state_kls(before, self._reservoir_distribution()).max().double()
            # Data parallel (torchrun): every rank shrinks by the same factor.
            self.last_state_kl = distributed.mean_over_ranks(largest).item()
        bound = self.state_kl_bound * self.trust_regions.targets[0]
        if math.isfinite(self.last_state_kl) and self.last_state_kl > bound:
            self.last_state_kl_factor = math.sqrt(bound / self.last_state_kl)
            self._shrink_step(optimizer, start, [self.last_state_kl_factor] + [1.0] * (len(start) - 1))
            self._measure_step(*pending)

    def _shrink_step(
        self, optimizer: th.optim.Optimizer, start: list[list[th.Tensor] | None], factors: list[float]
    ) -> None:
        """Shrink each region's last step toward its start (``factors``, one per region; 1 leaves it)."""
        with th.no_grad():
            for (region, _), before, factor in zip(self.trust_regions.regions, start, factors):
                if factor == 1.0 or before is None:
                    continue
                for param, old in zip(region, before):
                    param.sub_(old).mul_(factor).add_(old)
                    # The step as kept: the momentum buffer, and EKFAC's copy of it in the eigenbasis (on the layer's
                    # weight) so that a saved and loaded optimizer resumes from the same buffer.
                    state = optimizer.state.get(param, {})
                    for key in ("momentum_buffer", "momentum_in_basis"):
                        if (buffer := state.get(key)) is not None:
                            buffer.mul_(factor)

    def _bounds_reservoir_states(self) -> bool:
        """Whether the coming step is bounded at the reservoir's states (``state_kl_bound`` with a policy radius)."""
        return (
            self._keeps_state_reservoir
            and self.trust_regions.active_targets[0] is not None
            and int(self.state_reservoir_seen) > 0
        )

    def _reservoir_distribution(self) -> Any:
        """The policy's action distribution (cut from the graph) at the reservoir's states."""
        count = min(int(self.state_reservoir_seen), self.state_reservoir.shape[0])
        return self._reservoir_distribution_at(self.state_reservoir[:count])

    @th.no_grad()
    def _reservoir_distribution_at(self, states: th.Tensor) -> Any:
        """The action distribution (cut from the graph) at raw observations ``states``, in evaluation mode (a
        normalization layer's statistics are not moved by these passes)."""
        was_training = self.training
        self.train(False)
        try:
            distribution = self.get_distribution(states)  # the actor's pass only
        finally:
            self.train(was_training)
        return detached(distribution.distribution)

    def _measure_step(self, obs: th.Tensor, old_distribution: Any, old_values: th.Tensor) -> None:
        """``last_measured_kl`` and ``last_measured_vf_kl``: the KLs between the pass before the step and now."""
        with th.no_grad():
            distribution, values = actor_critic_forward(self, obs)
            policy_kl, vf_kl = self.trust_regions.measure(old_distribution, old_values, distribution, values)
            # Data parallel (torchrun): the KL over every rank's batch, so that all ranks calibrate alike.
            policy_kl, vf_kl = distributed.mean_over_ranks(th.stack([policy_kl.double(), vf_kl.double()])).unbind()
        self.last_measured_kl, self.last_measured_vf_kl = policy_kl.item(), vf_kl.item()

    # -- state ---------------------------------------------------------------------------------------------------

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # The trust regions keep the calibration; the buffer takes it only when the state is saved.
        bias = self.trust_regions.log_bias
        self.kl_log_bias[: len(bias)] = th.tensor(bias, dtype=th.float64)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A state saved before the calibration, the value scale or the observation statistics were (no such
        # buffers) loads with the calibration starting afresh, a value scale of 1 (the critic's outputs were in
        # reward units) and observations unnormalized.
        pending = state_dict.get(prefix + "state_reservoir_pending")
        if (
            self._keeps_state_reservoir
            and isinstance(pending, th.Tensor)
            and pending.shape[1:] == self.state_reservoir_pending.shape[1:]
        ):
            # The last rollout's states: as many rows as that rollout had.
            self.state_reservoir_pending = th.zeros_like(pending, device=self.state_reservoir_pending.device)
        saved_mean = state_dict.get(prefix + "observation_mean")
        if (
            self._normalized_keys
            and isinstance(saved_mean, th.Tensor)
            and saved_mean.dim() == 0
            and self.observation_mean.dim() == 1
        ):
            # Dict observations saved before their flat entries were normalized: the policy keeps taking them raw.
            self.normalize_observations = False
            for name in ("observation_mean", "observation_var", "observation_count"):
                setattr(self, name, th.zeros((), dtype=th.float64, device=self.observation_mean.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not self._keeps_state_reservoir:
            # Saved by a version that kept empty reservoir buffers without the bound (no rows, and the count and
            # seed as scalars): nothing to restore. A reservoir with states stays unexpected.
            unexpected_keys[:] = [
                key
                for key in unexpected_keys
                if not (key.startswith(prefix + "state_reservoir") and _is_empty_or_scalar(state_dict[key]))
            ]
        fresh = {
            "kl_log_bias": 0.0,
            "value_scale": 1.0,
            "value_target_moments": 0.0,
            "value_target_mean": 0.0,
            "advantage_moments": 0.0,
            "episode_end_moments": 0.0,
            "observation_mean": 0.0,
            "observation_var": 1.0,
            "observation_count": 0.0,
            "state_reservoir": 0.0,
            "state_reservoir_seen": 0,
            "state_reservoir_pending": 0.0,
            "state_reservoir_seed": 0,
        }
        for name, value in fresh.items():
            if prefix + name in missing_keys:  # (a reservoir buffer is only missing where the policy keeps one)
                missing_keys.remove(prefix + name)
                getattr(self, name).fill_(value)
        if prefix + "value_target_stats" in missing_keys:
            # Saved before the whole run's statistics were kept: they start from the running ones.
            missing_keys.remove(prefix + "value_target_stats")
            moments = self._running_target_moments()
            stats = [0.0, 0.0, 1.0] if moments is None else [1.0, *moments]
            self.value_target_stats.copy_(th.tensor(stats, dtype=th.float64))
        self.restore_host_state()

    def restore_host_state(self) -> None:
        """Read what the policy keeps on the host from its buffers: the calibration (``kl_log_bias``) and whether
        observations and value targets were observed. Loading a state does it; so must whoever writes the buffers
        in place otherwise (:func:`agents.data_parallel.start_alike`'s broadcast from rank 0). A state saved before
        ``value_target_moments`` was kept shows a learned value scale by ``value_scale`` alone."""
        bias = self.trust_regions.log_bias
        bias[:] = self.kl_log_bias[: len(bias)].tolist()
        self._observations_seen = bool(self.observation_count > 0)
        self._value_targets_seen = bool(self.value_target_moments[1] > 0) or float(self.value_scale) != 1.0


class KroneckerActorCriticCnnPolicy(KroneckerActorCriticPolicy):
    """:class:`KroneckerActorCriticPolicy` with SB3's NatureCNN features extractor (Atari)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class KroneckerMultiInputActorCriticPolicy(KroneckerActorCriticPolicy):
    """:class:`KroneckerActorCriticPolicy` for ``Dict`` observation spaces, with SB3's CombinedExtractor (one
    NatureCNN per image key, the other keys flattened and concatenated)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)


class NonNegativeProgress:
    """A schedule of SB3's progress remaining, evaluated at ``max(progress, 0)``: SB3's progress goes below 0 on a
    last rollout that overshoots ``total_timesteps``, where ``lambda progress: 0.25 * progress`` would hand the
    optimizer a negative learning rate."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __call__(self, progress_remaining: float) -> float:
        return self.schedule(max(0.0, progress_remaining))


class ValueTargetScale(BaseCallback):
    """Feeds each rollout to a :class:`KroneckerActorCriticPolicy` under SB3's A2C or PPO (ACKTR does it itself):
    ``model.learn(n, callback=ValueTargetScale())`` makes the critic's trust region reward-scale free there too,
    and normalizes the observations. It also holds the learning-rate schedule's progress at 0 past the end of the
    run (:class:`NonNegativeProgress`)."""

    def _on_training_start(self) -> None:
        if not isinstance(self.model.lr_schedule, NonNegativeProgress):
            self.model.lr_schedule = NonNegativeProgress(self.model.lr_schedule)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        policy = self.model.policy
        if not isinstance(policy, KroneckerActorCriticPolicy):
            raise TypeError(f"ValueTargetScale needs a KroneckerActorCriticPolicy, not {type(policy).__name__}")
        policy.observe_rollout(self.model.rollout_buffer)
