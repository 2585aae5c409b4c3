"""A model file that also loads its data, as federated-learning scripts do (written for rgap-audit's
tests): the data library is not installed, and the model does not need it."""

import torch.nn as nn
from rgap_test_absent_fl_datasets import load_partition  # noqa: F401  (only train() uses it)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.fc = nn.Linear(4 * 6 * 6, 2, bias=False)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def train(cid):
    trainloader, testloader = load_partition(cid)
    return trainloader, testloader
