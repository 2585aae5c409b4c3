"""The reference networks of the R-GAP paper (Zhu & Blaschko, ICLR 2021), written from their specs.

CNN6 and CNN6-d take 3x32x32 inputs, FCN3 takes 1x28x28; all are bias-free with LeakyReLU(0.2) and a
single output trained with the logistic loss. `RGAP_MODELS` declares what rgap-audit audits here.
"""

import torch.nn as nn


def cnn6(width2: int = 36) -> nn.Sequential:
    """CNN6 of the paper; width2=20 gives CNN6-d (second conv 12->20, third 20->36)."""
    act = lambda: nn.LeakyReLU(0.2)
    return nn.Sequential(
        nn.Conv2d(3, 12, kernel_size=4, stride=2, padding=2, bias=False),
        act(),
        nn.Conv2d(12, width2, kernel_size=3, stride=2, padding=1, bias=False),
        act(),
        nn.Conv2d(width2, 36, kernel_size=3, stride=1, padding=1, bias=False),
        act(),
        nn.Conv2d(36, 36, kernel_size=3, stride=1, padding=1, bias=False),
        act(),
        nn.Conv2d(36, 64, kernel_size=3, stride=2, padding=1, bias=False),
        act(),
        nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=False),
        act(),
        nn.Flatten(),
        nn.Linear(3200, 1, bias=False),
    )


def cnn6_d() -> nn.Sequential:
    """CNN6-d: CNN6 with a narrow second conv (12->20), rank-deficient by design."""
    return cnn6(width2=20)


def fcn3() -> nn.Sequential:
    """FCN3: 784-1000-100-1, bias-free, LeakyReLU(0.2)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(1000, 100, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(100, 1, bias=False),
    )


RGAP_MODELS = {
    "CNN6": {"factory": cnn6, "input_shape": (3, 32, 32), "loss": "logistic"},
    "CNN6-d": {"factory": cnn6_d, "input_shape": (3, 32, 32), "loss": "logistic"},
    "FCN3": {"factory": fcn3, "input_shape": (1, 28, 28), "loss": "logistic"},
}
