"""The KL trust regions of an SB3 actor-critic and the calibration of their radii against the measured KL (ACKTR and
the SB3 plug-in). The optimizer-side bookkeeping (regions, radii, the step-size rule, the predicted KL) is
:mod:`acktr_kfe.trust_region`; this module decides the regions of a policy, measures the KL of a step and divides
the next radii by the running bias of the quadratic model.

Separate actor and critic networks get one region each: ``max_kl`` bounds the policy's KL, ``vf_max_kl`` the
critic's, its output read as a Gaussian of standard deviation ``sigma / vf_fisher_coef`` (KL
``0.5 vf_fisher_coef^2 ((v_new - v_old) / sigma)^2``), ``sigma`` the policy's running scale of the value targets
(:class:`agents.policies.KroneckerActorCriticPolicy`): both radii are KLs in nats, free of the reward's units.
Layers shared by both get one joint region bounded by ``max_kl``.

Calibration: the quadratic model underestimates the KL of the step it proposes (the step is largest where the
sampled curvature estimate is smallest). After each step the KL is measured on the batch; a running average of
``log(measured / predicted)`` per region divides the next radius. For discrete actions a bias below 1 counts as
1, so the calibration never enlarges a radius beyond its target: near a nearly deterministic policy the damped
model overestimates the KL of the steps that sharpen it, and a radius enlarged by those let through the steps that
saturated the policy for good (docs/ACKTR.md, "Calibration that only shrinks the radius"). Gaussian policies keep
the enlargement, which measurably speeds up their early learning.
"""

from __future__ import annotations

import math
from typing import Any

import torch as th
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

import acktr_kfe
from acktr_kfe.trust_region import check_radius, is_real_number

# Running average of log(measured KL / predicted KL) over updates, and the range of the ratio.
KL_BIAS_DECAY = 0.9
KL_BIAS_RANGE = (0.1, 100.0)


def actor_critic_forward(policy: ActorCriticPolicy, obs: th.Tensor) -> tuple[Distribution, th.Tensor]:
    """One forward pass of an SB3 actor-critic: the action distribution and the values ``(N, 1)``."""
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        pi_features, vf_features = features
        latent_pi = policy.mlp_extractor.forward_actor(pi_features)
        latent_vf = policy.mlp_extractor.forward_critic(vf_features)
    return policy._get_action_dist_from_latent(latent_pi), policy.value_net(latent_vf)


def detached(distribution: Any) -> Any:
    """A copy of a torch distribution (or a list of them) cut from the graph, for the KL after the update."""
    if isinstance(distribution, list):
        return [detached(d) for d in distribution]
    if isinstance(distribution, Categorical):
        return Categorical(logits=distribution.logits.detach())
    if isinstance(distribution, Normal):
        return Normal(distribution.loc.detach(), distribution.scale.detach())
    if isinstance(distribution, Bernoulli):
        return Bernoulli(logits=distribution.logits.detach())
    raise TypeError(f"cannot measure the KL of a {type(distribution).__name__} policy distribution")


def state_kls(old: Any, new: Any) -> th.Tensor:
    """KL(old || new) at each state of the batch ``(N,)``, summed over independent action dimensions."""
    if isinstance(old, list):
        return sum(state_kls(o, n) for o, n in zip(old, new))
    kl = kl_divergence(old, new)
    return kl.reshape(kl.shape[0], -1).sum(-1) if kl.dim() > 1 else kl


def mean_kl(old: Any, new: Any) -> th.Tensor:
    """Mean over the batch of KL(old || new), summed over independent action dimensions."""
    return state_kls(old, new).mean()


def actor_and_critic_parameters(policy: ActorCriticPolicy) -> tuple[list[th.Tensor], list[th.Tensor]]:
    """The parameters the action distribution depends on, and those the value depends on (found by autograd on
    one sampled observation, so custom policies are covered)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    obs, _ = policy.obs_to_tensor(policy.observation_space.sample())
    # Evaluation mode: a normalization layer (BatchNorm) cannot take batch statistics of one observation, and the
    # probe must not move its running statistics; the dependency on the parameters is the same in both modes.
    was_training = policy.training
    policy.train(False)
    try:
        with th.enable_grad():
            distribution, values = actor_critic_forward(policy, obs)
            log_prob = distribution.log_prob(distribution.sample().detach()).sum()
            actor_grads = th.autograd.grad(log_prob, params, allow_unused=True, retain_graph=True)
            critic_grads = th.autograd.grad(values.sum(), params, allow_unused=True)
    finally:
        policy.train(was_training)
        # SB3's distribution object keeps the last distribution it made: the probe's, with its graph, would make
        # a freshly built policy impossible to copy.deepcopy (SB3's own fresh policies can be).
        policy.action_dist.distribution = None
    actor = [p for p, g in zip(params, actor_grads) if g is not None]
    critic = [p for p, g in zip(params, critic_grads) if g is not None]
    return actor, critic


def check_coefficient(value: Any, name: str) -> None:
    """A loss or curvature coefficient (``vf_coef``, ``ent_coef``, ``vf_fisher_coef``) must be a finite number
    >= 0; a string, NaN or Inf would only fail (or silently train nothing) once training started."""
    if not (is_real_number(value) and 0 <= value < math.inf):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_backtrack(backtrack: Any) -> None:
    """``backtrack`` must be ``None`` or a real number >= 1 (a step within its radius is never shrunk)."""
    if backtrack is not None and not (is_real_number(backtrack) and 1 <= backtrack < math.inf):
        raise ValueError(f"Invalid kl_backtrack: {backtrack!r} (a finite number >= 1, or None to keep every step)")


def check_state_kl_bound(bound: Any) -> None:
    """``bound`` must be ``None`` or a finite number >= 1 (a multiple of ``max_kl``)."""
    if bound is not None and not (is_real_number(bound) and 1 <= bound < math.inf):
        raise ValueError(
            f"Invalid state_kl_bound: {bound!r} (a finite number >= 1, the multiple of max_kl that the KL at any kept "
            "state may reach, or None for no bound)"
        )


class ActorCriticTrustRegions:
    """The trust regions of ``policy`` (see the module docstring) and their calibrated radii.

    Args:
        policy: the SB3 actor-critic.
        max_kl: radius of the policy's region (the joint one with shared layers); ``None``: unbounded.
        vf_max_kl: radius of a separate critic's region; ``None``: unbounded.
        vf_fisher_coef: the critic's Gaussian reading (standard deviation ``sigma / vf_fisher_coef``).
        calibrate: divide the radii by the running bias of the quadratic model.
        enlarge: let a bias below 1 enlarge the radii (up to 10 times); otherwise such a bias counts as 1.
        backtrack: a step whose measured KL exceeds ``backtrack`` times its region's radius (the target, before
            calibration) is shrunk back along its own direction to that radius (:meth:`backtrack_factors`);
            ``None``: steps are kept as taken.
        log_bias: a list to keep the running ``log(measured / predicted)`` per region in (updated in place, so
            an owner that saves it keeps the calibration); a new one by default.
    """

    def __init__(
        self,
        policy: ActorCriticPolicy,
        max_kl: float | None,
        vf_max_kl: float | None,
        vf_fisher_coef: float,
        calibrate: bool = True,
        log_bias: list[float] | None = None,
        enlarge: bool = False,
        backtrack: float | None = None,
    ) -> None:
        check_radius(max_kl)
        check_radius(vf_max_kl, "vf_max_kl")
        check_backtrack(backtrack)
        self.backtrack = backtrack
        self.vf_fisher_coef = vf_fisher_coef
        self.calibrate = calibrate
        self.enlarge = enlarge
        actor, critic = actor_and_critic_parameters(policy)
        critic_ids = {id(p) for p in critic}
        self.shared_layers = any(id(p) in critic_ids for p in actor)
        if self.shared_layers:
            self.regions: list[tuple[list[th.Tensor], float | None]] = [
                ([p for p in policy.parameters() if p.requires_grad], max_kl)
            ]
        else:
            self.regions = [(actor, max_kl), (critic, vf_max_kl)]
        self.log_bias = [] if log_bias is None else log_bias
        self.log_bias.extend([0.0] * (len(self.regions) - len(self.log_bias)))
        self.value_scale_known = True  # as last given to set_radii

    @property
    def targets(self) -> list[float | None]:
        """The uncalibrated radius of each region."""
        return [radius for _, radius in self.regions]

    @property
    def active_targets(self) -> list[float | None]:
        """:attr:`targets` with ``None`` for a region that :meth:`set_radii` left off (the one holding the critic
        while the value scale is unknown): what backtracking and the state bound act on."""
        return [
            None if not self.value_scale_known and (self.shared_layers or index == 1) else target
            for index, target in enumerate(self.targets)
        ]

    @property
    def kl_bias(self) -> float:
        """The running measured / predicted KL ratio of the first (policy or joint) region."""
        return math.exp(self.log_bias[0])

    def set_radii(self, optimizer: acktr_kfe.KroneckerPreconditioner, value_scale_known: bool = True) -> None:
        """Give each region of ``optimizer`` its radius for the next step: the target divided by the bias (by 1
        while the bias is below 1, unless ``enlarge``). Without ``value_scale_known`` the region that holds the
        critic has none (its own, or the joint one, which then bounds the policy neither): its KL is in units of
        the value targets' scale, unknown before a rollout's targets were observed, and a radius meant for those
        units would bind at whatever scale the rewards have."""
        self.value_scale_known = value_scale_known
        for index, target in enumerate(self.active_targets):
            if target is None:
                optimizer.set_trust_region_radius(index, None)
                continue
            bias = math.exp(self.log_bias[index]) if self.calibrate else 1.0
            if not self.enlarge:
                bias = max(bias, 1.0)
            optimizer.set_trust_region_radius(index, target / bias)

    def measure(
        self, old: Any, old_values: th.Tensor, new: Distribution, new_values: th.Tensor
    ) -> tuple[th.Tensor, th.Tensor]:
        """The mean KL of the policy and of the critic's Gaussian between two forward passes on one batch.

        ``old`` is the earlier pass's torch distribution cut from the graph (:func:`detached`); ``new`` the SB3
        distribution of the later pass; the values are the critic head's outputs, in units of ``sigma``."""
        policy_kl = mean_kl(old, new.distribution)
        vf_kl = 0.5 * self.vf_fisher_coef**2 * (new_values - old_values).square().mean()
        return policy_kl, vf_kl

    def per_region(self, policy_kl: float, vf_kl: float) -> list[float]:
        """The measured KL of each region: the policy's and the critic's, or their sum for one joint region."""
        return [policy_kl + vf_kl] if self.shared_layers else [policy_kl, vf_kl]

    def backtrack_factors(self, policy_kl: float, vf_kl: float) -> list[float]:
        """Per region, the factor to shrink the last step by: ``sqrt(radius / measured)`` where the measured KL
        exceeds ``backtrack`` times the region's target radius (the KL grows as the square of the step's length
        near the old parameters), else 1; 1 for a region that is off (:attr:`active_targets`). A non-finite
        measurement gives 1: it is the NaN checks' to report."""
        factors = [1.0] * len(self.regions)
        if self.backtrack is None:
            return factors
        for index, (value, target) in enumerate(zip(self.per_region(policy_kl, vf_kl), self.active_targets)):
            if target is not None and math.isfinite(value) and value > self.backtrack * target:
                factors[index] = math.sqrt(target / value)
        return factors

    def update(self, optimizer: acktr_kfe.KroneckerPreconditioner, policy_kl: float, vf_kl: float) -> None:
        """Fold the measured KLs of the last step into the running bias of each region."""
        if not self.calibrate:
            return
        measured = self.per_region(policy_kl, vf_kl)
        low, high = (math.log(bound) for bound in KL_BIAS_RANGE)
        for index, (value, predicted) in enumerate(zip(measured, optimizer.last_predicted_kls.tolist())):
            if predicted > 0 and value > 0 and math.isfinite(value):
                ratio = min(max(math.log(value / predicted), low), high)
                self.log_bias[index] += (1 - KL_BIAS_DECAY) * (ratio - self.log_bias[index])
