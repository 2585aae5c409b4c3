"""Classifier heads that end in log-softmax (trained with NLLLoss) or softmax (written for rgap-audit's tests)."""

import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 30, bias=False)
        self.fc2 = nn.Linear(30, 5, bias=False)

    def forward(self, x):
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2))


class LogSoftmaxNet(Net):
    def forward(self, x):
        x = F.leaky_relu(self.fc1(x), 0.2)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class LogSoftmaxModuleNet(Net):
    def __init__(self):
        super().__init__()
        self.out = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.out(self.fc2(F.leaky_relu(self.fc1(x), 0.2)))


class SoftmaxNet(Net):
    def forward(self, x):
        return F.softmax(self.fc2(F.leaky_relu(self.fc1(x), 0.2)), dim=1)


RGAP_MODELS = {"Logits": Net, "LogSoftmax": LogSoftmaxNet, "LogSoftmaxModule": LogSoftmaxModuleNet, "Softmax": SoftmaxNet}
