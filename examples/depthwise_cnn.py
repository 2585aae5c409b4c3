"""A depthwise-separable CNN (MobileNet-style blocks: depthwise 3x3 conv with groups = channels, then a
pointwise 1x1 conv), bias-free with LeakyReLU(0.2) as in the R-GAP paper's networks, so that the chain
passes every activation and the ranks of the grouped convolutions decide the verdict.
"""

import torch.nn as nn


def separable(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """Depthwise 3x3 (one filter per input channel) + pointwise 1x1, each followed by LeakyReLU."""
    return [
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.LeakyReLU(0.2),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.LeakyReLU(0.2),
    ]


def depthwise_cnn(width: int = 8, num_classes: int = 1, size: int = 16) -> nn.Sequential:
    """Stem conv 3->width, two separable blocks (stride 2 each), Flatten, Linear; input 3 x size x size."""
    side = (size + 3) // 4
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        *separable(width, 2 * width, stride=2),
        *separable(2 * width, 4 * width, stride=2),
        nn.Flatten(),
        nn.Linear(4 * width * side * side, num_classes, bias=False),
    )


RGAP_MODELS = {
    "DepthwiseCNN": {"factory": depthwise_cnn, "input_shape": (3, 16, 16), "loss": "logistic"},
}
