"""A small CNN with ReLU activations.

ReLU is not invertible: the layer below it gets forward constraints only on the active units. Its
zeros are known to an attacker who knows the activation pattern (read off the recovered output), so
they are not unknowns; on this small input the gradient rows make up the rest and the audit still
finds the input recoverable (rgap-audit examples/relu_cnn.py --verify confirms it).
"""

import torch.nn as nn


class ReluCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, stride=1, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 7 * 7, 10, bias=False)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.flatten(1))


RGAP_MODELS = {"ReluCNN": {"factory": ReluCNN, "input_shape": (1, 14, 14)}}
