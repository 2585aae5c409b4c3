"""A 1-D CNN for multichannel sequences (4 channels x 64 steps): a plain conv, a dilated strided conv,
average pooling and a Linear head, bias-free with LeakyReLU(0.2) and the logistic loss.
"""

import torch.nn as nn


def conv1d_net(length: int = 64) -> nn.Sequential:
    """Input (4, length), length a multiple of 4."""
    return nn.Sequential(
        nn.Conv1d(4, 8, kernel_size=5, padding=2, bias=False),
        nn.LeakyReLU(0.2),
        nn.Conv1d(8, 16, kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
        nn.LeakyReLU(0.2),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(16 * (length // 4), 1, bias=False),
    )


RGAP_MODELS = {
    "Conv1dNet": {"factory": conv1d_net, "input_shape": (4, 64), "loss": "logistic"},
}
