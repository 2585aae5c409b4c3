"""A GRU sequence classifier (written for rgap-audit's tests): the last hidden state feeds a Linear head."""

import torch.nn as nn


class GRUClassifier(nn.Module):
    def __init__(self, n_features=8, hidden=16, n_classes=3):
        super().__init__()
        self.gru = nn.GRU(n_features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, n_classes)

    def forward(self, x):
        out, h = self.gru(x)
        return self.fc(out[:, -1])


RGAP_MODELS = {"GRUClassifier": {"factory": GRUClassifier, "input_shape": (5, 8)}}
