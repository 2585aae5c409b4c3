"""MobileNetV2 (Sandler et al. 2018) for 32x32 inputs, written from the paper's description.

Inverted residual blocks: a 1x1 expansion (ratio t), a 3x3 depthwise convolution, a linear 1x1
projection, each followed by BatchNorm (ReLU6 after the first two), with an identity shortcut when
the block keeps its shape. The CIFAR variant keeps stride 1 in the stem and the first strided stage,
as public CIFAR repositories do. `mobilenetv2_cifar()` is the full network (2.2 M parameters);
`mobilenetv2_tiny()` is a two-block version that audits in a few seconds.
"""

import torch.nn as nn


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_shortcut = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, stride s) per stage, CIFAR strides
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, stages=STAGES, stem: int = 32, last: int = 1280, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks = []
        c_in = stem
        for t, c, n, s in stages:
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


def mobilenetv2_cifar() -> MobileNetV2:
    """The full CIFAR MobileNetV2 (10 classes, 3x32x32)."""
    return MobileNetV2()


def mobilenetv2_tiny() -> MobileNetV2:
    """Stem of 4 channels, one expanding block with an identity shortcut and one strided block; 10 classes."""
    return MobileNetV2(stages=((2, 4, 2, 1), (2, 8, 1, 2)), stem=4, last=16)


RGAP_MODELS = {
    "MobileNetV2-CIFAR": {"factory": mobilenetv2_cifar, "input_shape": (3, 32, 32)},
    "MobileNetV2-tiny": {"factory": mobilenetv2_tiny, "input_shape": (3, 16, 16)},
}
