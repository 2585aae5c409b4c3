"""An MLP whose first Linear has a bias: its gradient leaks the input exactly (x = dW[j] / db[j])."""

import torch.nn as nn


class BiasedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)  # bias=True: the leak
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
