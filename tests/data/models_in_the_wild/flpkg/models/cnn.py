import torch.nn as nn

from ..utils import NUM_CLASSES, conv_out
from .blocks import conv_block


class SmallCNN(nn.Module):
    def __init__(self, size=8):
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 4, 2), conv_block(4, 4, 1))
        side = conv_out(size, 3, 2, 1)
        self.classifier = nn.Linear(4 * side * side, NUM_CLASSES, bias=False)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


RGAP_MODELS = {"SmallCNN": {"factory": SmallCNN, "input_shape": (1, 8, 8)}}
