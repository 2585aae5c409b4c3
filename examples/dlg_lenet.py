"""A LeNet in the style of the gradient-leakage literature (DLG, Zhu et al. 2019), written here from its description.

3x32x32 inputs, three biased 5x5 convolutions with Sigmoid activations (stride 2, 2, 1; 12 channels each), one
biased Linear to 10 classes, cross-entropy loss: the model the leakage papers recover first. `LeNet` keeps
PyTorch's default initialisation; `LeNet-DLG-init` draws every weight and bias uniformly from [-0.5, 0.5], as the
DLG demonstration does, which saturates more sigmoid units and worsens the conditioning of the layers' systems.
"""

import torch
import torch.nn as nn


class LeNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        act = nn.Sigmoid
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, kernel_size=5, padding=5 // 2, stride=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1),
            act(),
        )
        self.fc = nn.Sequential(nn.Linear(768, num_classes))

    def forward(self, x):
        out = self.body(x)
        out = out.view(out.size(0), -1)
        return self.fc(out)


def weights_init(m: nn.Module) -> None:
    """Uniform [-0.5, 0.5] weights and biases (the DLG demonstration's initialisation)."""
    if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor):
        m.weight.data.uniform_(-0.5, 0.5)
    if getattr(m, "bias", None) is not None:
        m.bias.data.uniform_(-0.5, 0.5)


def lenet_dlg_init() -> nn.Module:
    net = LeNet()
    net.apply(weights_init)
    return net


RGAP_MODELS = {
    "LeNet": {"factory": LeNet, "input_shape": (3, 32, 32), "loss": "cross-entropy"},
    "LeNet-DLG-init": {"factory": lenet_dlg_init, "input_shape": (3, 32, 32), "loss": "cross-entropy"},
}
