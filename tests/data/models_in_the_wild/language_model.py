"""An RNN language model in the style of the PyTorch word-language-model example, and a sequence-first
classifier (written for rgap-audit's tests): forward(input, hidden), inputs of shape (T, B)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RNNModel(nn.Module):
    """Container module with an encoder, a recurrent module, and a decoder."""

    def __init__(self, rnn_type="LSTM", ntoken=40, ninp=8, nhid=12, nlayers=1, dropout=0.5):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


class SeqFirstMLP(nn.Module):
    """A classifier over a (T, B, F) sequence: time steps concatenated, then two Linear layers."""

    def __init__(self, steps=5, features=3):
        super().__init__()
        self.fc1 = nn.Linear(steps * features, 10, bias=False)
        self.fc2 = nn.Linear(10, 3, bias=False)

    def forward(self, seq):
        x = seq.permute(1, 0, 2).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


class BatchFirstMLP(SeqFirstMLP):
    """The same classifier taking (B, T, F): the oracle of the sequence-first one."""

    def forward(self, seq):
        return self.fc2(torch.tanh(self.fc1(seq.flatten(1))))


BPTT = 6
RGAP_MODELS = {
    "LSTM-LM": {
        "factory": lambda: RNNModel("LSTM"),
        "example_inputs": lambda model, batch: (torch.zeros(BPTT, batch, dtype=torch.long), model.init_hidden(batch)),
        "private_input": "input",
        "batch_dim": 1,
        "output": 0,
    },
    "GRU-LM": {
        "factory": lambda: RNNModel("GRU"),
        "example_inputs": lambda model: (torch.zeros(BPTT, 1, dtype=torch.long), model.init_hidden(1)),
        "batch_dim": 1,
    },
    "Undeclared-LM": lambda: RNNModel("GRU"),
    "SeqFirstMLP": {"factory": SeqFirstMLP, "input_shape": (5, 3), "batch_dim": 1, "loss": "cross-entropy"},
    "BatchFirstMLP": {"factory": BatchFirstMLP, "input_shape": (5, 3), "loss": "cross-entropy"},
}
