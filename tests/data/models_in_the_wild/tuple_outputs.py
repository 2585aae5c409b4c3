"""Forwards that return more than the logits, as research code often does (written for rgap-audit's tests).

The R-GAP authors' LeNet-style nets return `(logits, shapes)` so that their attack knows every layer's
output shape; others return features next to the logits, a dict, or a dataclass.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def body():
    act = nn.Sigmoid
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=3, padding=1, stride=2), act(),
        nn.Conv2d(6, 6, kernel_size=3, padding=1, stride=1), act(),
    )


class LeNetShapes(nn.Module):
    """forward returns (logits, the shapes of the intermediate outputs)."""

    def __init__(self):
        super().__init__()
        self.body = body()
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        x_shape = []
        out = self.body(x)
        x_shape.append(out.shape)
        feature = out.view(out.size(0), -1)
        out = self.fc(feature)
        return out, x_shape


class LeNetLogits(nn.Module):
    """The same network returning its logits only (the oracle of the tests)."""

    def __init__(self):
        super().__init__()
        self.body = body()
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(self.body(x).view(x.size(0), -1))


class FeaturesThenLogits(nn.Module):
    """forward returns (features, logits): the logits are output 1."""

    def __init__(self):
        super().__init__()
        self.body = body()
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        feats = self.body(x).flatten(1)
        return feats, self.fc(feats)


class DictOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = body()
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        feats = torch.flatten(self.body(x), 1)
        return {"features": feats, "logits": self.fc(feats), "probs": F.softmax(self.fc(feats), dim=1)}


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    embedding: torch.Tensor


class DataclassOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = body()
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        emb = self.body(x).flatten(1)
        return ClassifierOutput(logits=self.fc(emb), embedding=emb)


SHAPE = (1, 12, 12)
RGAP_MODELS = {
    "LeNetShapes": {"factory": LeNetShapes, "input_shape": SHAPE},
    "LeNetLogits": {"factory": LeNetLogits, "input_shape": SHAPE},
    "FeaturesThenLogits": {"factory": FeaturesThenLogits, "input_shape": SHAPE, "output": 1},
    "DictOutputs": {"factory": DictOutputs, "input_shape": SHAPE, "output": "logits"},
    "DataclassOutputs": {"factory": DataclassOutputs, "input_shape": SHAPE},
    "WrongKey": {"factory": DictOutputs, "input_shape": SHAPE, "output": "scores"},
}
