"""ResNet-style networks with batch norm and residual additions (He et al. 2016), written from the spec.

`resnet_small` is a two-stage ResNet for 3x16x16 inputs that audits in seconds; `resnet18` is the
ImageNet ResNet-18 (11.7 M parameters, 3x224x224) used by benchmarks/bench_scale.py. Both use ReLU,
BatchNorm after every convolution, identity shortcuts and 1x1 projection shortcuts where the shape
changes, global average pooling and a Linear classifier (cross-entropy).
"""

import torch.nn as nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()  # one module object used at two places
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks (the first block of each stage after the first has stride 2), pool, head."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes: int = 1000, imagenet_stem: bool = True):
        super().__init__()
        w0 = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, w0, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(w0),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        stages = []
        c_in = w0
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def resnet_small() -> ResNet:
    """Two stages (8 and 16 channels, one block each: one identity and one projection shortcut), 10 classes."""
    return ResNet(widths=(8, 16), blocks=(1, 1), num_classes=10, imagenet_stem=False)


def resnet_tiny() -> ResNet:
    """The smallest CIFAR-style residual net: stem conv-BN-ReLU (8 channels), one basic block with an
    identity shortcut, average pooling and a Linear head (10 classes); for 3x16x16 inputs."""
    return ResNet(widths=(8,), blocks=(1,), num_classes=10, imagenet_stem=False)


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    """ResNet-18 for 32x32 inputs as CIFAR repositories write it: 3x3 stem, no max-pool (11.2 M parameters)."""
    return ResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=num_classes, imagenet_stem=False)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 for 3x224x224 inputs."""
    return ResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=num_classes, imagenet_stem=True)


RGAP_MODELS = {
    "ResNet-tiny": {"factory": resnet_tiny, "input_shape": (3, 16, 16), "loss": "cross-entropy"},
    "ResNetBN-small": {"factory": resnet_small, "input_shape": (3, 16, 16), "loss": "cross-entropy"},
    "ResNet18": {"factory": resnet18, "input_shape": (3, 224, 224), "loss": "cross-entropy"},
}
