"""A DCGAN-style decoder: a latent code of 16 goes through a Linear layer, is reshaped to 8 x 4 x 4 and
upsampled by two transposed convolutions (k4, stride 2, padding 1: 4x4 -> 8x8 -> 16x16), bias-free with
LeakyReLU(0.2). A Linear scoring head on the 2 x 16 x 16 output makes it a one-output model for the
logistic loss. DecoderNarrow upsamples 8 -> 1 channel with k = stride = 2: fewer gradient and forward
rows than unknowns, so that transposed convolution is deficient (and the layer below recovers it jointly).

The analysis treats each transposed convolution as the equivalent stride-1 convolution of its input
with zeros inserted between entries (known, not unknowns); the closed-form attack (--verify) does not
handle transposed convolutions and says so.
"""

import torch.nn as nn


def decoder(latent: int = 16, width: int = 8) -> nn.Sequential:
    """Input (latent,): Linear -> (width, 4, 4) -> ConvT -> (width // 2, 8, 8) -> ConvT -> (2, 16, 16) -> head."""
    return nn.Sequential(
        nn.Linear(latent, width * 4 * 4, bias=False),
        nn.Unflatten(1, (width, 4, 4)),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(width // 2, 2, 4, stride=2, padding=1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(2 * 16 * 16, 1, bias=False),
    )


def decoder_narrow(latent: int = 8) -> nn.Sequential:
    """Input (latent,): Linear -> (8, 4, 4) -> ConvT 8 -> 1 (k2, s2) -> (1, 8, 8) -> head."""
    return nn.Sequential(
        nn.Linear(latent, 8 * 4 * 4, bias=False),
        nn.Unflatten(1, (8, 4, 4)),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 1, 2, stride=2, bias=False),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(64, 1, bias=False),
    )


RGAP_MODELS = {
    "Decoder": {"factory": decoder, "input_shape": (16,), "loss": "logistic"},
    "DecoderNarrow": {"factory": decoder_narrow, "input_shape": (8,), "loss": "logistic"},
}
