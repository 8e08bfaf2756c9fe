"""ACKTR as a Stable-Baselines3 algorithm.

Paper: Wu, Mansimov, Liao, Grosse, Ba, "Scalable trust-region method for deep reinforcement learning using
Kronecker-factored approximation" (NeurIPS 2017, arXiv:1708.05144). Preconditioner: EKFAC (George et al. 2018)
or K-FAC from :mod:`acktr_kfe`.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import (
    ActorCriticCnnPolicy,
    ActorCriticPolicy,
    BasePolicy,
    MultiInputActorCriticPolicy,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

import acktr_kfe
from acktr_kfe.optim import check_radius

from .policies import curvature_loss, log_std_fisher_diagonals
from .trust_region import ActorCriticTrustRegions, actor_critic_forward, detached

SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

PRECONDITIONERS = ("ekfac", "kfac")


class ACKTR(OnPolicyAlgorithm):
    """Actor critic using Kronecker-factored trust region (ACKTR).

    Each update, on the whole rollout (``n_steps * n_envs`` transitions):

    1. n-step returns (``gae_lambda=1``) or GAE advantages, as SB3's A2C.
    2. A curvature pass: the Fisher of the policy, from actions *sampled from the current policy*
       (``-log pi(a_sampled | s)``), plus the Gauss-Newton matrix of the critic (an output gradient of 1 per state,
       exact ``J^T J`` for the squared-error value loss) scaled by ``vf_fisher_coef``. Layers shared by actor and
       critic (a CNN trunk) receive both: their G factor sums the policy's Fisher statistics and
       ``vf_fisher_coef**2`` times the critic's (the cross terms vanish in expectation, since the score of a
       sampled action has mean zero).
    3. The gradient of the training loss ``policy_loss + ent_coef * entropy_loss + vf_coef * value_loss``,
       preconditioned by EKFAC (default) or K-FAC, and a momentum step scaled by the KL trust region:
       ``u = momentum buf + D``, ``nu = min(1, sqrt(2 radius / (lr^2 u^T F u)))`` (the region bounds the step
       actually taken, momentum included). No gradient-norm clipping unless ``max_grad_norm`` is set.

    Trust regions. With separate actor and critic networks (SB3's ``MlpPolicy``; the paper's MuJoCo setting) each
    gets its own region, as the paper applies K-FAC to each separately: the policy's KL is bounded by ``max_kl``,
    and the critic's, its output read as a Gaussian of standard deviation ``1 / vf_fisher_coef`` (KL
    ``0.5 vf_fisher_coef^2 (v_new - v_old)^2``), by ``vf_max_kl``. With shared layers (``CnnPolicy``) one region
    bounds the joint KL of policy and critic by ``max_kl`` (the paper's Atari setting).

    Calibration (``calibrate_kl``, on by default). The quadratic model underestimates the KL of the step it
    proposes: the step is largest where the sampled curvature estimate is smallest, so its errors are amplified.
    After each update ACKTR measures the KL on the batch (one forward pass) and keeps a running average of
    ``log(measured / predicted)`` per region; the next update's radius is the target divided by that bias. The
    measured KL then stays near ``max_kl`` (CartPole-v1: median 1.05 ``max_kl`` over 30k steps, against 2.75
    without calibration; docs/BENCHMARKS.md).

    A diagonal Gaussian policy's state-independent ``log_std`` (no layer owns it) takes its exact natural-gradient
    step: its per-example Fisher is 2 per action dimension, so it moves by ``grad / (2 + damping)`` and counts in
    the trust region.

    Logged every update: ``train/policy_loss``, ``train/value_loss``, ``train/entropy_loss``,
    ``train/explained_variance``, ``train/kl_clip_scale``, ``train/predicted_kl``, ``train/measured_kl`` (between the
    policy before and after the update, on the batch), ``train/measured_vf_kl``, ``train/vf_kl_clip_scale`` and
    ``train/vf_predicted_kl`` (separate critic), ``train/kl_bias`` (calibration), ``train/damping``,
    ``train/learning_rate``, ``time/eigh_ms``, and ``train/std`` for Gaussian policies; SB3 adds ``time/fps``.

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or an ``ActorCriticPolicy`` subclass.
        env: the environment, or its registered id.
        learning_rate: step size ``eta`` (or a schedule of the remaining progress).
        n_steps: steps per environment per update.
        gamma: discount factor.
        gae_lambda: GAE parameter (1.0: plain n-step returns, as the paper).
        ent_coef: entropy bonus coefficient.
        vf_coef: value loss coefficient in the training loss.
        vf_fisher_coef: weight of the critic's Gauss-Newton loss in the curvature pass.
        max_kl: trust-region radius of the policy (joint with the critic when layers are shared), as KL per
            update; ``None`` disables it.
        vf_max_kl: trust-region radius of a separate critic (see above); ``None`` disables it. It bounds the mean
            squared change of the value by ``2 vf_max_kl / vf_fisher_coef**2``, in reward units: with raw returns
            in the hundreds the critic crawls (normalize rewards, as ``VecNormalize`` does, or raise it), with
            normalized rewards 0.01 to 0.03 is a good range (configs/acktr.yml).
        calibrate_kl: divide the radii by the running bias of the quadratic model (see above).
        damping: Tikhonov damping of the preconditioner.
        momentum: momentum of the preconditioned step.
        preconditioner: ``"ekfac"`` or ``"kfac"``.
        factor_decay, factor_update_interval, eigen_update_interval, scale_update_interval: statistics of the
            preconditioner (see :class:`acktr_kfe.EKFAC`).
        max_grad_norm: optional clipping of the raw gradient norm before preconditioning (off by default).
        normalize_advantage: normalize advantages over the batch.
        Other arguments: as SB3's ``A2C``.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": ActorCriticPolicy,
        "CnnPolicy": ActorCriticCnnPolicy,
        "MultiInputPolicy": MultiInputActorCriticPolicy,
    }

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 0.25,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.5,
        vf_fisher_coef: float = 1.0,
        max_kl: float | None = 0.001,
        vf_max_kl: float | None = 0.1,
        calibrate_kl: bool = True,
        damping: float = 0.1,
        momentum: float = 0.9,
        preconditioner: str = "ekfac",
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        eigen_update_interval: int = 10,
        scale_update_interval: int = 1,
        max_grad_norm: float | None = None,
        normalize_advantage: bool = False,
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
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"Invalid preconditioner: {preconditioner!r}. Valid values: {', '.join(PRECONDITIONERS)}")
        if not vf_fisher_coef >= 0:
            raise ValueError(f"Invalid vf_fisher_coef: {vf_fisher_coef!r} (must be >= 0)")
        check_radius(max_kl)
        check_radius(vf_max_kl, "vf_max_kl")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (must be > 0, or None to disable)")
        if not (isinstance(n_steps, int) and n_steps >= 1):
            raise ValueError(f"Invalid n_steps: {n_steps!r} (must be an integer >= 1)")
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
        self.vf_fisher_coef = vf_fisher_coef
        self.max_kl = max_kl
        self.vf_max_kl = vf_max_kl
        self.calibrate_kl = calibrate_kl
        self._kl_log_bias = [0.0, 0.0]
        self.damping = damping
        self.momentum = momentum
        self.preconditioner = preconditioner
        self.factor_decay = factor_decay
        self.factor_update_interval = factor_update_interval
        self.eigen_update_interval = eigen_update_interval
        self.scale_update_interval = scale_update_interval
        self.normalize_advantage = normalize_advantage
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        self._trust = ActorCriticTrustRegions(
            self.policy, self.max_kl, self.vf_max_kl, self.vf_fisher_coef, self.calibrate_kl, self._kl_log_bias
        )
        self.policy.optimizer = self._build_preconditioner()

    @property
    def shared_layers(self) -> bool:
        """Whether actor and critic share layers (one joint trust region)."""
        return self._trust.shared_layers

    def _excluded_save_params(self) -> list[str]:
        # The regions hold the policy's parameters; they are rebuilt on load (the calibration, a list, is saved).
        return [*super()._excluded_save_params(), "_trust"]

    def _build_preconditioner(self) -> acktr_kfe.KFAC | acktr_kfe.EKFAC:
        options: dict[str, Any] = {
            "lr": self.lr_schedule(1),
            "momentum": self.momentum,
            "damping": self.damping,
            # ACKTR's damping values (configs/acktr.yml) were tuned as absolute damping.
            "damping_scaling": "absolute",
            "trust_regions": self._trust.regions,
            "trust_region_mode": "step",
            "factor_decay": self.factor_decay,
            "factor_update_interval": self.factor_update_interval,
            "eigen_update_interval": self.eigen_update_interval,
            "curvature": "fisher",
        }
        diagonals = log_std_fisher_diagonals(self.policy)
        if self.preconditioner == "ekfac":
            return acktr_kfe.EKFAC(
                self.policy, scale_update_interval=self.scale_update_interval, fisher_diagonals=diagonals, **options
            )
        return acktr_kfe.KFAC(self.policy, damping_mode="eigen", fisher_diagonals=diagonals, **options)

    def _distribution_and_values(self, observations: th.Tensor) -> tuple[Distribution, th.Tensor]:
        """One forward pass of the actor-critic: the action distribution and the state values ``(N,)``."""
        distribution, values = actor_critic_forward(self.policy, observations)
        return distribution, values.flatten()

    def train(self) -> None:
        """One ACKTR update on the collected rollout."""
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate(optimizer)

        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            distribution, values = self._distribution_and_values(rollout_data.observations)
            log_prob = distribution.log_prob(actions)
            entropy = distribution.entropy()

            advantages = rollout_data.advantages
            if self.normalize_advantage and len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = -(advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values)
            entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
            loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

            optimizer.zero_grad()
            # Curvature: Fisher of the policy at actions sampled from it, Gauss-Newton of the critic.
            optimizer.curvature_backward(curvature_loss(distribution, values, self.vf_fisher_coef), retain_graph=True)
            loss.backward()
            if self.clip_grad_norm is not None:
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.clip_grad_norm)
            old_distribution, old_values = detached(distribution.distribution), values.detach()
            self._trust.set_radii(optimizer)
            optimizer.step()
            with th.no_grad():
                new_distribution, new_values = self._distribution_and_values(rollout_data.observations)
                measured_kl, measured_vf_kl = self._trust.measure(
                    old_distribution, old_values, new_distribution, new_values
                )
            self._trust.update(optimizer, measured_kl.item(), measured_vf_kl.item())

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        scales, predicted = optimizer.last_kl_clip_scales.tolist(), optimizer.last_predicted_kls.tolist()
        self.logger.record("train/kl_clip_scale", scales[0])
        self.logger.record("train/predicted_kl", predicted[0])
        if len(scales) > 1:
            self.logger.record("train/vf_kl_clip_scale", scales[1])
            self.logger.record("train/vf_predicted_kl", predicted[1])
        self.logger.record("train/measured_kl", measured_kl.item())
        self.logger.record("train/measured_vf_kl", measured_vf_kl.item())
        if self.calibrate_kl:
            self.logger.record("train/kl_bias", self._trust.kl_bias)
        self.logger.record("train/damping", optimizer.param_groups[0]["damping"])
        self.logger.record("time/eigh_ms", optimizer.last_eigh_ms)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.last_measured_kl = measured_kl.item()

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
