"""ACKTR as a Stable-Baselines3 algorithm.

Paper: Wu, Mansimov, Liao, Grosse, Ba, "Scalable trust-region method for deep reinforcement learning using
Kronecker-factored approximation" (NeurIPS 2017, arXiv:1708.05144). Preconditioner: EKFAC (George et al. 2018)
or K-FAC from :mod:`acktr_kfe`.
"""

from __future__ import annotations

import inspect
import io
import math
import pathlib
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

import acktr_kfe
from acktr_kfe.trust_region import check_radius, is_positive_int, is_real_number

from .kl_calibration import check_coefficient, check_state_kl_bound
from .policies import (
    ACKTR_PRECONDITIONER_DEFAULTS,
    KroneckerActorCriticCnnPolicy,
    KroneckerActorCriticPolicy,
    KroneckerMultiInputActorCriticPolicy,
    check_curvature,
    check_preconditioner,
)
from .rl_checkpoint import CorruptedFileError, check_saved_algorithm, diagnosed_load, saved_agent_file

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

# The value of an argument whose default depends on the action space (resolved when the env is known).
AUTO = "auto"
# Defaults by kind of action space (docs/ACKTR.md, "Defaults by action space", has the runs behind them).
# Discrete actions (also MultiDiscrete and MultiBinary): the ACKTR paper's 20-step rollouts, n-step returns, radius
# 0.001 and one joint step per update (tuned on CartPole-v1). Continuous actions (Box): 128-step rollouts, GAE 0.95,
# radius 0.01 and a diagonal Gaussian starting at standard deviation exp(-1) = 0.37 (tuned on HalfCheetah-v5 and
# Hopper-v5 with one env: from never reaching their thresholds in 200k steps to medians of 50k and 62k steps), and
# four steps of the critic alone after each joint step (session 25, docs/ACKTR.md "A fitted critic").
DISCRETE_DEFAULTS: dict[str, Any] = {"n_steps": 20, "gae_lambda": 1.0, "max_kl": 0.001, "n_critic_updates": 1}
# ACKTR's normalize_advantage modes besides True (per batch) and False (raw): by the running spread of the returns,
# by the advantages' own running root mean square, or by the spread capped by that root mean square.
ADVANTAGE_SCALES = ("returns", "running", "capped")


def is_advantage_normalization(value: Any) -> bool:
    """Whether ``value`` is an ACKTR ``normalize_advantage`` setting: a bool or one of :data:`ADVANTAGE_SCALES`."""
    return isinstance(value, bool) or (isinstance(value, str) and value in ADVANTAGE_SCALES)


def advantage_normalization_choices(true: str = "True", false: str = "False") -> str:
    """The ``normalize_advantage`` settings for an error message, the booleans spelled as the caller's users write
    them (Python's ``True``, YAML's ``true``): ``"True, False, 'returns', 'running' or 'capped'"``."""
    names = [true, false, *(repr(mode) for mode in ADVANTAGE_SCALES)]
    return f"{', '.join(names[:-1])} or {names[-1]}"


CONTINUOUS_DEFAULTS: dict[str, Any] = {
    "n_steps": 128,
    "gae_lambda": 0.95,
    "max_kl": 0.01,
    "n_critic_updates": 5,
    "log_std_init": -1.0,
}


def action_space_defaults(action_space: spaces.Space) -> dict[str, Any]:
    """ACKTR's defaults for ``n_steps``, ``gae_lambda``, ``max_kl`` and ``n_critic_updates`` on an action space, and
    for ``Box`` actions the policy's ``log_std_init``."""
    if isinstance(action_space, spaces.Box):
        return dict(CONTINUOUS_DEFAULTS)
    return dict(DISCRETE_DEFAULTS)


# ACKTR's own arguments that configure its policy (they become policy_kwargs).
_POLICY_ARGUMENTS = (
    "preconditioner",
    "max_kl",
    "vf_max_kl",
    "calibrate_kl",
    "vf_fisher_coef",
    "curvature",
    "kl_backtrack",
    "state_kl_bound",
)
_PRECONDITIONER_ARGUMENTS = (
    "damping",
    "momentum",
    "factor_decay",
    "factor_update_interval",
    "eigen_update_interval",
    "scale_update_interval",
)


class ACKTR(OnPolicyAlgorithm):
    """Actor critic using Kronecker-factored trust region (ACKTR).

    A thin SB3 algorithm over :class:`agents.policies.KroneckerActorCriticPolicy`, as SB3's A2C is over
    ``ActorCriticPolicy``: the policy owns the preconditioner, the curvature pass, the trust regions, their
    calibration and the value scale, so one ACKTR update is the step SB3's A2C takes with that policy on the same
    batch (given the same advantages). Each update, on the whole rollout (``n_steps * n_envs`` transitions):

    1. n-step returns (``gae_lambda=1``) or GAE advantages, as SB3's A2C; the returns update the policy's running
       value scale ``sigma`` (root mean square of the targets), the observations its observation normalization.
    2. A curvature pass (inside ``policy.evaluate_actions``): the Fisher of the policy, from actions *sampled from
       the current policy* (``-log pi(a_sampled | s)``), plus the Gauss-Newton matrix of the critic (an output
       gradient of 1 per state on the value in units of ``sigma``) scaled by ``vf_fisher_coef``. Layers shared by
       actor and critic (a CNN trunk) receive both (the cross terms vanish in expectation, since the score of a
       sampled action has mean zero).
    3. The gradient of A2C's loss ``policy_loss + ent_coef * entropy_loss + vf_coef * value_loss`` (the value
       loss's gradient reaches the critic divided by ``sigma**2``; advantages divided by the running spread of
       the returns by default), preconditioned by EKFAC (default) or K-FAC, and a momentum step scaled by the KL
       trust region: ``u = momentum buf + D``, ``nu = min(1, sqrt(2 radius / (lr^2 u^T F u)))`` (the region
       bounds the step actually taken, momentum included). No gradient-norm clipping unless ``max_grad_norm`` is set.

    Trust regions. With separate actor and critic networks (``MlpPolicy``; the paper's MuJoCo setting) each gets
    its own region, as the paper applies K-FAC to each separately: the policy's KL is bounded by ``max_kl``, and
    the critic's, its output read as a Gaussian of standard deviation ``sigma / vf_fisher_coef`` (KL
    ``0.5 vf_fisher_coef^2 ((v_new - v_old) / sigma)^2``), by ``vf_max_kl``. Both are KLs in nats: multiplying
    every reward by a constant changes neither the steps nor the trust-region scales. With shared layers
    (``CnnPolicy``) one region bounds the joint KL of policy and critic by ``max_kl`` (the paper's Atari setting).

    Calibration (``calibrate_kl``, on by default). The quadratic model underestimates the KL of the step it
    proposes: the step is largest where the sampled curvature estimate is smallest, so its errors are amplified.
    After each update the policy measures the KL on the batch (one forward pass) and keeps a running average of
    ``log(measured / predicted)`` per region; the next update's radius is the target divided by that bias, for
    discrete actions the target itself while the bias is below 1 (the calibration never enlarges their radii).

    Observations (flat ``Box`` spaces, and the flat ``Box`` entries of ``Dict`` ones) are normalized inside the policy
    by their running mean and variance (``policy_kwargs={"normalize_observations": False}`` turns it off, e.g. behind
    VecNormalize).

    A diagonal Gaussian policy's state-independent ``log_std`` (no layer owns it) takes its exact natural-gradient
    step: its per-example Fisher is 2 per action dimension.

    Logged every update: ``train/policy_loss``, ``train/value_loss``, ``train/entropy_loss``,
    ``train/explained_variance``, ``train/kl_clip_scale``, ``train/predicted_kl``, ``train/measured_kl`` (between the
    policy before and after the update, on the batch), ``train/measured_vf_kl``, ``train/vf_kl_clip_scale`` and
    ``train/vf_predicted_kl`` (separate critic), ``train/kl_bias`` (with ``calibrate_kl``), ``train/value_scale``
    (``sigma``), ``train/value_error`` (root mean square of the rollout's returns minus the values predicted when it
    was collected, in the units of the rewards the agent sees: normalized ones behind VecNormalize),
    ``train/value_target_spread`` (the running spread of the value targets, which ``normalize_advantage="returns"``
    divides the advantages by), ``train/advantage_scale`` (the advantages' running root mean square, which
    ``normalize_advantage="running"`` divides them by), ``train/capped_divisor`` (what
    ``normalize_advantage="capped"`` divides them by: the running spread, capped at 3 times the advantage scale,
    then held at the floor scaled by ``train/time_limit_fraction``), ``train/time_limit_fraction`` (the share of
    recent episodes cut by their time limit), ``train/damping``, ``train/learning_rate``,
    ``time/eigh_ms``, and ``train/std`` for Gaussian policies; with ``kl_backtrack`` ``train/kl_backtrack_factor``
    (and ``train/vf_kl_backtrack_factor``), with ``state_kl_bound`` ``train/state_kl`` and
    ``train/state_kl_factor``; SB3 adds ``time/fps``.

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` (Dict observations) or a
            :class:`~agents.policies.KroneckerActorCriticPolicy` subclass.
        env: the environment, or its registered id.
        learning_rate: the natural-gradient step size ``eta`` of the paper (or a schedule of the remaining
            progress): ACKTR's preconditioner takes the natural step (``step_norm="natural"``), where the
            policy's default under SB3's A2C and PPO grafts Adam's step length.
        n_steps: steps per environment per update; ``"auto"`` (default): 20 for discrete actions, 128 for ``Box``
            actions (:func:`action_space_defaults`).
        gamma: discount factor.
        gae_lambda: GAE parameter (1.0: plain n-step returns, as the paper); ``"auto"`` (default): 1.0 for discrete
            actions, 0.95 for ``Box`` actions.
        ent_coef: entropy bonus coefficient.
        vf_coef: value loss coefficient in the training loss.
        vf_fisher_coef: weight of the critic's Gauss-Newton loss in the curvature pass.
        n_critic_updates: natural-gradient steps of the critic per update: the joint step of actor and critic,
            then ``n_critic_updates - 1`` steps of the critic alone on the same rollout's returns (within the
            critic's trust region at the radius calibrated for the joint step, with the joint step's curvature; no
            new statistics, and these steps are not measured, calibrated on or backtracked). Each counts as an
            optimizer step, and the preconditioner's schedules count optimizer steps while only joint steps carry
            statistics: a refresh, factor or scale update then comes on the joint steps whose step number is a
            multiple of its interval, every ``lcm(n, interval) / n`` updates for ``n`` critic updates (the
            eigenbasis every 2 updates at 5, every 10 at 3, with ``eigen_update_interval=10``). Separate actor and
            critic networks only (``MlpPolicy``); more than 1 with shared layers is refused. ``"auto"`` (default):
            1 for discrete actions (the paper's one joint step), 5 for ``Box`` actions, 1 where actor and critic
            share layers. With the default ``normalize_advantage="capped"`` the policy's step keeps its size however
            well the critic fits, and the fitted critic raised the mean final return at 300k steps on
            HalfCheetah-v5 (tuned on) and on Walker2d-v5 and InvertedDoublePendulum-v5 (kept apart from tuning)
            (docs/ACKTR.md, "A fitted critic").
        max_kl: trust-region radius of the policy (joint with the critic when layers are shared), as KL per
            update; ``None`` disables it; ``"auto"`` (default): 0.001 for discrete actions, 0.01 for ``Box`` actions.
            For ``Box`` actions the Gaussian policy also starts at standard deviation ``exp(-1)`` unless
            ``policy_kwargs`` sets ``log_std_init``.
        vf_max_kl: trust-region radius of a separate critic, a KL in nats of its Gaussian reading (see above): the
            value moves by about ``sqrt(2 vf_max_kl) sigma / vf_fisher_coef`` per update at most, whatever the
            reward scale; ``None`` disables it.
        calibrate_kl: divide the radii by the running bias of the quadratic model (see above).
        kl_backtrack: after each update the KL is measured on the batch; a region whose measured KL exceeds
            ``kl_backtrack`` times its target (``max_kl``, or ``vf_max_kl`` for the critic, before calibration) has
            its step shrunk along its own direction by ``sqrt(target / measured)`` (the KL grows as the step's
            square), momentum buffer included, and the KL is measured again (one more forward pass): the logged
            ``train/measured_kl`` is the KL after backtracking, while the calibration (``train/kl_bias``) learns from
            the step as proposed. The factors are logged as ``train/kl_backtrack_factor`` (and
            ``train/vf_kl_backtrack_factor`` for a separate critic). ``None`` (default): steps are kept as taken.
        state_kl_bound: bound the policy's KL at every state kept from earlier rollouts (a uniform reservoir of
            ``policy_kwargs["state_reservoir_size"]`` = 4096 states over the whole run, flat ``Box`` observations
            only) by ``state_kl_bound`` times ``max_kl``: after each update the policy (the joint region with shared
            layers) is evaluated at those states, and where the largest KL exceeds the bound its step is shrunk
            along its own direction by ``sqrt(bound / largest)``, once. ``max_kl`` bounds the KL averaged over the
            batch, where rare states (an episode's first steps) weigh little; this bound keeps the policy from
            drifting at them. Logged as ``train/state_kl`` (the largest KL, before shrinking) and
            ``train/state_kl_factor``. ``None`` (default): no bound. Opt-in: with 10 every tuned-on MuJoCo seed
            reached its threshold, while untuned MuJoCo tasks were level or lower (docs/ACKTR.md, "A bound at the
            states of earlier rollouts").
        damping: Tikhonov damping of the preconditioner, absolute: added to the curvature along each direction of
            the Kronecker-factored eigenbasis (EKFAC's second moments, K-FAC's eigenvalue products). Directions with
            less curvature than it are stepped along much as by a gradient step. 0.03 and 0.01 were faster on the
            tuned-on envs and ended Walker2d-v5 lower (docs/ACKTR.md, "The damping").
        momentum: momentum of the preconditioned step; 0 by default. The region bounds the step taken,
            ``momentum buf + D``, and with 0.9 the previous step (already at the radius) kept nearly every step at
            the radius whether the new gradient carried signal or not (docs/ACKTR.md, "Momentum 0").
        preconditioner: ``"ekfac"`` or ``"kfac"`` (or any name registered with
            :func:`acktr_kfe.register_preconditioner`).
        curvature: the policy's curvature source: ``"fisher"`` (default; actions sampled from the policy, the
            paper's) or ``"ief"`` (the taken actions, each example's gradient divided by the norm of its loss
            gradient at the logits or the Gaussian's mean; Wu et al. 2024). The critic's is Gauss-Newton in both.
        factor_decay, factor_update_interval, eigen_update_interval, scale_update_interval: statistics of the
            preconditioner (see :class:`acktr_kfe.EKFAC`).
        max_grad_norm: optional clipping of the raw gradient norm before preconditioning (off by default).
        normalize_advantage: ``"capped"`` (default since session 24): divide advantages by the running standard
            deviation of the value targets, capped at 3 times the advantages' own running root mean square and
            held at least at a quarter of the targets' whole-run spread (at or above the run's mean return) scaled
            by the share of recent episodes cut by their time limit
            (:meth:`~agents.policies.KroneckerActorCriticPolicy.capped_divisor`): free of the reward's units; steps
            shrink inside the trust region when the advantages carry little against the returns, a learned
            balancing task's included, while a policy whose episodes all end alike by failing keeps moving where
            the critic fits its returns well (measured in docs/ACKTR.md); ``"returns"`` (the default until session
            24): the same without the cap, the floor unscaled
            (:meth:`~agents.policies.KroneckerActorCriticPolicy.value_target_spread`; what VecNormalize's reward
            scaling with raw advantages does); ``True``: normalize them over the batch (SB3's A2C; every step then
            reaches the region's edge); ``"running"``: divide them by their own running root mean square over
            rollouts (decay 0.9 per rollout, not centred;
            :meth:`~agents.policies.KroneckerActorCriticPolicy.advantage_scale`): free of the reward's units and of
            how well the critic fits, so the policy's step keeps the region's size as TRPO's does, without
            centring a short rollout's advantages; ``False``: raw advantages.
        policy_kwargs: further arguments of the policy (``preconditioner_kwargs`` among them); they may not
            repeat an argument ACKTR takes itself.
        Other arguments: as SB3's ``A2C``.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": KroneckerActorCriticPolicy,
        "CnnPolicy": KroneckerActorCriticCnnPolicy,
        "MultiInputPolicy": KroneckerMultiInputActorCriticPolicy,
    }
    policy: KroneckerActorCriticPolicy

    def __init__(
        self,
        policy: str | type[KroneckerActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int | str = AUTO,
        gamma: float = 0.99,
        gae_lambda: float | str = AUTO,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        vf_fisher_coef: float = 1.0,
        n_critic_updates: int | str = AUTO,
        max_kl: float | str | None = AUTO,
        vf_max_kl: float | None = 0.003,
        calibrate_kl: bool = True,
        kl_backtrack: float | None = None,
        state_kl_bound: float | None = None,
        damping: float = 0.1,
        momentum: float = 0.0,
        preconditioner: str = "ekfac",
        curvature: str = "fisher",
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        eigen_update_interval: int = 10,
        scale_update_interval: int = 1,
        max_grad_norm: float | None = None,
        normalize_advantage: bool | str = "capped",
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_preconditioner(preconditioner)
        check_curvature(curvature)
        for name, value in (("vf_fisher_coef", vf_fisher_coef), ("vf_coef", vf_coef), ("ent_coef", ent_coef)):
            check_coefficient(value, name)
        if max_kl != AUTO:
            check_radius(max_kl)
        check_radius(vf_max_kl, "vf_max_kl")
        check_state_kl_bound(state_kl_bound)
        if gae_lambda != AUTO and not (is_real_number(gae_lambda) and 0 <= gae_lambda <= 1):
            raise ValueError(f"Invalid gae_lambda: {gae_lambda!r} (a number in [0, 1], or 'auto')")
        if not (is_real_number(damping) and damping > 0 and math.isfinite(damping)):
            raise ValueError(f"Invalid damping: {damping!r} (must be a finite float > 0)")
        if not (is_real_number(gamma) and 0 <= gamma <= 1):
            raise ValueError(f"Invalid gamma: {gamma!r} (a number in [0, 1])")
        initial_rate = learning_rate(1.0) if callable(learning_rate) else learning_rate
        if not (is_real_number(initial_rate) and initial_rate >= 0 and math.isfinite(initial_rate)):
            what = "the learning-rate schedule's value at the start" if callable(learning_rate) else "learning_rate"
            raise ValueError(f"Invalid learning rate: {initial_rate!r} ({what}; must be a finite float >= 0)")
        if not is_advantage_normalization(normalize_advantage):
            raise ValueError(
                f"Invalid normalize_advantage: {normalize_advantage!r} ({advantage_normalization_choices()})"
            )
        if max_grad_norm is not None and not (is_real_number(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0, or None to disable)")
        if n_critic_updates != AUTO and not is_positive_int(n_critic_updates):
            raise ValueError(f"Invalid n_critic_updates: {n_critic_updates!r} (an integer >= 1, or 'auto')")
        if n_steps != AUTO and not is_positive_int(n_steps):
            raise ValueError(f"Invalid n_steps: {n_steps!r} (an integer >= 1, or 'auto')")
        if isinstance(policy, type) and not issubclass(policy, KroneckerActorCriticPolicy):
            raise TypeError(
                f"ACKTR needs a KroneckerActorCriticPolicy (or its aliases {', '.join(self.policy_aliases)}), not "
                f"{policy.__name__}: the policy owns the preconditioner and the trust regions"
            )
        arguments = locals()
        policy_kwargs = dict(policy_kwargs or {})
        repeated = sorted(set(policy_kwargs) & set(_POLICY_ARGUMENTS))
        if repeated:
            raise ValueError(f"pass {repeated} to ACKTR itself, not in policy_kwargs")
        repeated = sorted(set(policy_kwargs.get("preconditioner_kwargs") or {}) & set(_PRECONDITIONER_ARGUMENTS))
        if repeated:
            raise ValueError(f"pass {repeated} to ACKTR itself, not in policy_kwargs['preconditioner_kwargs']")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm if max_grad_norm is not None else float("inf"),
            use_sde=False,
            sde_sample_freq=-1,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary),
        )
        self.clip_grad_norm = max_grad_norm
        for name in (*_POLICY_ARGUMENTS, *_PRECONDITIONER_ARGUMENTS):
            setattr(self, name, arguments[name])
        self.normalize_advantage = normalize_advantage
        self.n_critic_updates = n_critic_updates
        if getattr(self, "action_space", None) is not None:  # unset inside ACKTR.load, which restores the values
            self._resolve_defaults()
        if _init_setup_model:
            self._setup_model()

    def _resolve_defaults(self) -> None:
        """Replace the arguments left at ``"auto"`` by :func:`action_space_defaults` of the env (``n_critic_updates``
        in :meth:`_setup_model`, once the policy says whether its actor and critic share layers)."""
        defaults = action_space_defaults(self.action_space)
        for name in ("n_steps", "gae_lambda", "max_kl"):
            if getattr(self, name) == AUTO:
                setattr(self, name, defaults[name])

    def _setup_model(self) -> None:
        # Episodes ended since the last update: [at their time limit, all] (policy.observe_episode_ends).
        self._episode_ends = [0, 0]
        # ACKTR's own arguments reach the policy here, not through self.policy_kwargs, so that the saved
        # policy_kwargs are the user's and ``ACKTR.load(path, policy_kwargs=...)`` passes SB3's equality check.
        user_kwargs = self.policy_kwargs
        policy_kwargs = {**user_kwargs, **{name: getattr(self, name) for name in _POLICY_ARGUMENTS}}
        if "log_std_init" in (defaults := action_space_defaults(self.action_space)):
            policy_kwargs.setdefault("log_std_init", defaults["log_std_init"])
        preconditioner_kwargs = {**ACKTR_PRECONDITIONER_DEFAULTS, **(user_kwargs.get("preconditioner_kwargs") or {})}
        preconditioner_kwargs.update({name: getattr(self, name) for name in _PRECONDITIONER_ARGUMENTS})
        accepted = inspect.signature(acktr_kfe.preconditioner_class(self.preconditioner)).parameters
        if "scale_update_interval" not in accepted:  # K-FAC has no scale to estimate
            del preconditioner_kwargs["scale_update_interval"]
        policy_kwargs["preconditioner_kwargs"] = preconditioner_kwargs
        self.policy_kwargs = policy_kwargs
        try:
            super()._setup_model()
        finally:
            self.policy_kwargs = user_kwargs
        if self.n_critic_updates == AUTO:  # shared layers take 1: their critic cannot step alone
            self.n_critic_updates = 1 if self.shared_layers else defaults["n_critic_updates"]
        if self.n_critic_updates > 1 and self.shared_layers:
            raise ValueError(
                f"n_critic_updates={self.n_critic_updates} needs separate actor and critic networks: with shared "
                "layers a step of the critic alone would move the policy outside its trust region; use 1"
            )

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        """SB3's progress remaining, held at 0 once ``num_timesteps`` passes ``total_timesteps`` (the last rollout
        overshoots when ``total_timesteps`` is not a multiple of ``n_steps * n_envs``): a schedule such as
        ``lambda progress: 0.25 * progress`` then gives 0, not the negative learning rate the optimizer refuses."""
        super()._update_current_progress_remaining(num_timesteps, total_timesteps)
        self._current_progress_remaining = max(0.0, self._current_progress_remaining)

    @property
    def shared_layers(self) -> bool:
        """Whether actor and critic share layers (one joint trust region)."""
        return self.policy.trust_regions.shared_layers

    def train(self) -> None:
        """One ACKTR update on the collected rollout: SB3's A2C update, through the Kronecker policy."""
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate(optimizer)
        self.policy.observe_rollout(self.rollout_buffer)
        self.policy.observe_episode_ends(*self._episode_ends)
        self._episode_ends = [0, 0]

        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
            values = values.flatten()

            advantages = rollout_data.advantages
            if self.normalize_advantage == "returns":
                advantages = advantages / self.policy.value_target_spread()
            elif self.normalize_advantage == "capped":
                advantages = advantages / self.policy.capped_divisor()
            elif self.normalize_advantage == "running":
                advantages = advantages / self.policy.advantage_scale()
            elif self.normalize_advantage and len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = -(advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values)
            entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
            loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

            self._optimizer_step(loss)
            # The joint step's trust-region scales and predicted KLs (the critic's steps below replace them).
            scales, predicted = optimizer.last_kl_clip_scales.tolist(), optimizer.last_predicted_kls.tolist()
            for _ in range(self.n_critic_updates - 1):
                values = self.policy.critic_values(rollout_data.observations).flatten()
                self._optimizer_step(self.vf_coef * F.mse_loss(rollout_data.returns, values))

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        # The critic's error in reward units: the explained variance of one rollout says little where its returns
        # barely vary (a balanced pole), against the spread of the targets over rollouts.
        value_error = float(np.sqrt(np.mean((self.rollout_buffer.returns - self.rollout_buffer.values) ** 2)))
        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        self.logger.record("train/kl_clip_scale", scales[0])
        self.logger.record("train/predicted_kl", predicted[0])
        if len(scales) > 1:
            self.logger.record("train/vf_kl_clip_scale", scales[1])
            self.logger.record("train/vf_predicted_kl", predicted[1])
        self.logger.record("train/measured_kl", self.policy.last_measured_kl)
        self.logger.record("train/measured_vf_kl", self.policy.last_measured_vf_kl)
        if self.calibrate_kl:
            self.logger.record("train/kl_bias", self.policy.trust_regions.kl_bias)
        if self.kl_backtrack is not None:
            factors = self.policy.last_backtrack_factors
            self.logger.record("train/kl_backtrack_factor", factors[0])
            if len(factors) > 1:
                self.logger.record("train/vf_kl_backtrack_factor", factors[1])
        if self.state_kl_bound is not None:
            self.logger.record("train/state_kl", self.policy.last_state_kl)
            self.logger.record("train/state_kl_factor", self.policy.last_state_kl_factor)
        self.logger.record("train/value_scale", float(self.policy.value_scale))
        self.logger.record("train/value_error", value_error)
        self.logger.record("train/value_target_spread", self.policy.value_target_spread())
        self.logger.record("train/advantage_scale", self.policy.advantage_scale())
        self.logger.record("train/capped_divisor", self.policy.capped_divisor())
        self.logger.record("train/time_limit_fraction", self.policy.time_limit_fraction())
        self.logger.record("train/damping", optimizer.param_groups[0]["damping"])
        self.logger.record("time/eigh_ms", optimizer.last_eigh_ms)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

    def _excluded_save_params(self) -> list[str]:
        # The episode ends counted since the last update: always [0, 0] between updates, where SB3 saves.
        return [*super()._excluded_save_params(), "_episode_ends"]

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        """SB3's episode bookkeeping, plus the count of ended episodes and of those cut by their time limit
        (``policy.time_limit_fraction``)."""
        super()._update_info_buffer(infos, dones)
        if dones is None:
            return
        for info, done in zip(infos, dones):
            # Whole episodes only (Monitor's record: not a life lost under Atari's EpisodicLifeEnv), and only where
            # the VecEnv says how they ended (SB3's do); an env that does not say leaves the fraction at 1.
            if done and "episode" in info and "TimeLimit.truncated" in info:
                self._episode_ends[0] += int(bool(info["TimeLimit.truncated"]))
                self._episode_ends[1] += 1

    def _optimizer_step(self, loss: th.Tensor) -> None:
        """One step of the policy's preconditioner on ``loss`` (SB3's gradient-norm clipping first, where set)."""
        optimizer = self.policy.optimizer
        optimizer.zero_grad()
        loss.backward()
        if self.clip_grad_norm is not None:
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip_grad_norm)
        optimizer.step()

    def learn(
        self: SelfACKTR,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "ACKTR",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfACKTR:
        """Train for ``total_timesteps`` environment steps (SB3's ``learn``)."""
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfACKTR],
        path: str | pathlib.Path | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        print_system_info: bool = False,
        force_reset: bool = True,
        **kwargs: Any,
    ) -> SelfACKTR:
        """SB3's ``load``, with a damaged file reported as ``CorruptedFileError`` naming the file and the member
        that does not read, and a policy whose saved parameters are not all finite refused.

        Raises:
            FileNotFoundError: no file at ``path`` (nor at ``path`` + ``.zip``).
            CorruptedFileError: the file does not read, has no ``data`` member, or holds non-finite policy
                parameters.
            ValueError: the file holds an agent saved by another algorithm (A2C, PPO), named in the message.
        """

        def load() -> SelfACKTR:
            return super(ACKTR, cls).load(path, env, device, custom_objects, print_system_info, force_reset, **kwargs)

        file = None
        if isinstance(path, str | pathlib.Path):
            file = saved_agent_file(path)
            check_saved_algorithm(file, cls)
        model = diagnosed_load(load, file, cls.__name__, reraise_intact=True) if file is not None else load()
        bad = [name for name, param in model.policy.named_parameters() if not bool(th.isfinite(param).all())]
        if bad:
            raise CorruptedFileError(
                f"{file or 'the saved agent'} holds non-finite policy parameters ({', '.join(bad[:4])}"
                f"{', ...' if len(bad) > 4 else ''}): it was saved from a run that diverged; load an earlier "
                "checkpoint or train again"
            )
        return model
