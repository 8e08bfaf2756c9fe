"""A features extractor with parameters for the tests: shared by actor and critic, it makes one joint trust region."""

from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


class LinearFeatures(BaseFeaturesExtractor):
    """One tanh layer of 8 units over a flat observation."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=8)
        self.linear = torch.nn.Linear(observation_space.shape[0], 8)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(observations))


# policy_kwargs of a policy whose actor and critic share that layer.
SHARED_TRUNK = {"features_extractor_class": LinearFeatures, "share_features_extractor": True}
