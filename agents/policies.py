"""Kronecker-factored preconditioning inside SB3's own algorithms (A2C, PPO): one policy class.

    from stable_baselines3 import PPO
    from agents.policies import KroneckerActorCriticPolicy

    model = PPO(KroneckerActorCriticPolicy, "CartPole-v1", learning_rate=0.1)

The policy replaces its optimizer with :class:`acktr_kfe.EKFAC` (or K-FAC) in Fisher mode. Whenever the algorithm
evaluates actions with gradients enabled (once per A2C update, once per PPO minibatch), the policy runs the
curvature pass right there: the Fisher of the policy at actions *sampled from the current policy*, plus the
Gauss-Newton matrix of the critic, so the curvature never comes from the advantage-weighted loss. SB3's
gradient-norm clipping acts on the raw gradient before ``optimizer.step()`` preconditions it, so it scales the
natural-gradient step uniformly instead of undoing it; the KL trust region (``max_kl``) bounds the step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import Schedule

import acktr_kfe

from .trust_region import ActorCriticTrustRegions, actor_critic_forward, detached

# Per-example Fisher of a Gaussian's log standard deviation, per action dimension: E[(z^2 - 1)^2] = 2.
GAUSSIAN_LOG_STD_FISHER = 2.0


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
    ``vf_fisher_coef`` times the critic's Gauss-Newton loss (an output gradient of 1 per state)."""
    sampled = distribution.sample().detach()
    loss = -distribution.log_prob(sampled).mean()
    if vf_fisher_coef:
        loss = loss + vf_fisher_coef * acktr_kfe.gauss_newton_loss(values)
    return loss


_DEFAULTS: dict[str, Any] = {
    "momentum": 0.9,
    "damping": 0.1,
    "damping_scaling": "absolute",
    "factor_update_interval": 1,
    "eigen_update_interval": 10,
}


class KroneckerActorCriticPolicy(ActorCriticPolicy):
    """SB3's ``ActorCriticPolicy`` preconditioned by EKFAC or K-FAC (see the module docstring).

    The trust regions are ACKTR's (:mod:`agents.trust_region`): with separate actor and critic networks (SB3's
    default ``MlpPolicy`` layout) ``max_kl`` bounds the policy's KL and ``vf_max_kl`` the critic's, with shared
    layers one joint region is bounded by ``max_kl``; each bounds the momentum step actually taken. After every
    optimizer step the policy measures the KL on the minibatch it just evaluated (one forward pass) and, with
    ``calibrate_kl``, divides the next radius by the running bias of the quadratic model. The last measurement is
    in ``last_measured_kl`` and ``last_measured_vf_kl``. The calibration is kept in the buffer ``kl_log_bias``, so
    it is saved and loaded with the policy's parameters.

    Args:
        preconditioner: ``"ekfac"`` (default) or ``"kfac"``.
        preconditioner_kwargs: keyword arguments of :class:`acktr_kfe.EKFAC` / :class:`acktr_kfe.KFAC` that
            override the defaults (momentum 0.9, damping 0.1, factors every step, eigenbasis every 10 steps).
            The learning rate comes from the algorithm; the trust regions from the arguments below.
        max_kl: radius of the policy's trust region (KL per optimizer step); ``None`` disables it.
        vf_max_kl: radius of a separate critic's region; ``None`` disables it.
        calibrate_kl: calibrate the radii against the measured KL.
        vf_fisher_coef: weight of the critic's Gauss-Newton loss in the curvature pass.
        Other arguments: as ``ActorCriticPolicy`` (``optimizer_class`` and ``optimizer_kwargs`` are ignored).
    """

    def __init__(
        self,
        *args: Any,
        preconditioner: str = "ekfac",
        preconditioner_kwargs: dict[str, Any] | None = None,
        max_kl: float | None = 0.001,
        vf_max_kl: float | None = 0.1,
        calibrate_kl: bool = True,
        vf_fisher_coef: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if preconditioner not in ("ekfac", "kfac"):
            raise ValueError(f"Invalid preconditioner: {preconditioner!r}. Valid values: ekfac, kfac")
        if not vf_fisher_coef >= 0:
            raise ValueError(f"Invalid vf_fisher_coef: {vf_fisher_coef!r} (must be >= 0)")
        reserved = sorted({"lr", "max_kl", "trust_regions", "curvature"} & set(preconditioner_kwargs or {}))
        if reserved:
            raise ValueError(
                f"preconditioner_kwargs may not set {reserved}: the learning rate comes from the algorithm, the "
                "trust regions from max_kl / vf_max_kl, and the curvature is the Fisher"
            )
        self.preconditioner = preconditioner
        self.preconditioner_kwargs = dict(preconditioner_kwargs or {})
        self.max_kl, self.vf_max_kl, self.calibrate_kl = max_kl, vf_max_kl, calibrate_kl
        self.vf_fisher_coef = vf_fisher_coef
        self.last_measured_kl = self.last_measured_vf_kl = float("nan")
        self._pending: tuple[th.Tensor, Any, th.Tensor] | None = None
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        self.trust_regions = ActorCriticTrustRegions(
            self, self.max_kl, self.vf_max_kl, self.vf_fisher_coef, self.calibrate_kl
        )
        # The running log(measured / predicted KL) per region, saved with the parameters (padded to two regions).
        self.register_buffer("kl_log_bias", th.zeros(2, dtype=th.float64))
        options = {
            **_DEFAULTS,
            "trust_region_mode": "step",
            **self.preconditioner_kwargs,
            "lr": lr_schedule(1),
            "curvature": "fisher",
            "trust_regions": self.trust_regions.regions,
        }
        options.setdefault("fisher_diagonals", log_std_fisher_diagonals(self))
        cls = acktr_kfe.EKFAC if self.preconditioner == "ekfac" else acktr_kfe.KFAC
        self.optimizer = cls(self, **options)
        self.optimizer.register_step_post_hook(self._after_step)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            preconditioner=self.preconditioner,
            preconditioner_kwargs=self.preconditioner_kwargs,
            max_kl=self.max_kl,
            vf_max_kl=self.vf_max_kl,
            calibrate_kl=self.calibrate_kl,
            vf_fisher_coef=self.vf_fisher_coef,
        )
        return data

    def evaluate_actions(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values, log-probabilities and entropy, as SB3's; in training, also the curvature pass, and the
        minibatch is kept to measure the KL of the step that follows."""
        distribution, values = actor_critic_forward(self, obs)
        if self.training and th.is_grad_enabled():
            self.optimizer.curvature_backward(
                curvature_loss(distribution, values, self.vf_fisher_coef), retain_graph=True
            )
            self._pending = (obs, detached(distribution.distribution), values.detach())
            self.trust_regions.set_radii(self.optimizer)
        return values, distribution.log_prob(actions), distribution.entropy()

    def _after_step(self, optimizer: th.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each optimizer step: the measured KL on the last evaluated minibatch, and the calibration."""
        if self._pending is None:
            return
        obs, old_distribution, old_values = self._pending
        self._pending = None
        with th.no_grad():
            distribution, values = actor_critic_forward(self, obs)
            policy_kl, vf_kl = self.trust_regions.measure(old_distribution, old_values, distribution, values)
        self.last_measured_kl, self.last_measured_vf_kl = policy_kl.item(), vf_kl.item()
        self.trust_regions.update(self.optimizer, self.last_measured_kl, self.last_measured_vf_kl)

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
        # A state saved before the calibration was (no kl_log_bias) loads with the calibration starting afresh.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "kl_log_bias" in missing_keys:
            missing_keys.remove(prefix + "kl_log_bias")
            self.kl_log_bias.zero_()
        bias = self.trust_regions.log_bias
        bias[:] = self.kl_log_bias[: len(bias)].tolist()


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
