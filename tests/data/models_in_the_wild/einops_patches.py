"""Patch embeddings written with einops, ViT style (written for rgap-audit's tests), and the same nets
written with torch's own permute / flatten / unflatten (the oracle)."""

import torch
import torch.nn as nn
from einops import rearrange
from einops.layers.torch import Rearrange


class ConvPatches(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4, bias=False), Rearrange("b e h w -> b (h w) e"))
        self.mlp_head = nn.Sequential(nn.Tanh(), Rearrange("b n e -> b (n e)"), nn.Linear(16 * dim, 4, bias=False))

    def forward(self, img):
        return self.mlp_head(self.to_patch_embedding(img))


class ConvPatchesTorch(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4, bias=False))
        self.mlp_head = nn.Sequential(nn.Tanh(), nn.Flatten(1), nn.Linear(16 * dim, 4, bias=False))

    def forward(self, img):
        x = self.to_patch_embedding(img).flatten(2).transpose(1, 2)
        return self.mlp_head[2](self.mlp_head[1](self.mlp_head[0](x)))


class LinearPatches(nn.Module):
    def __init__(self, p=4, dim=16):
        super().__init__()
        self.to_patch = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        self.proj = nn.Linear(3 * p * p, dim, bias=False)
        self.head = nn.Linear(4 * dim, 3, bias=False)

    def forward(self, img):
        x = torch.tanh(self.proj(self.to_patch(img)))
        return self.head(rearrange(x, "b n d -> b (n d)"))


class LinearPatchesTorch(LinearPatches):
    def forward(self, img):
        b = img.shape[0]
        x = img.unflatten(2, (2, 4)).unflatten(4, (2, 4))  # b c h p1 w p2
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(b, 4, 48)  # b (h w) (p1 p2 c)
        x = torch.tanh(self.proj(x))
        return self.head(torch.flatten(x, 1))


RGAP_MODELS = {
    "ConvPatches": {"factory": ConvPatches, "input_shape": (3, 16, 16)},
    "ConvPatchesTorch": {"factory": ConvPatchesTorch, "input_shape": (3, 16, 16)},
    "LinearPatches": {"factory": LinearPatches, "input_shape": (3, 8, 8)},
    "LinearPatchesTorch": {"factory": LinearPatchesTorch, "input_shape": (3, 8, 8)},
}
