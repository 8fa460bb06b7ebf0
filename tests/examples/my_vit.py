"""A Vision Transformer written from scratch, as in a researcher's own training script: its own module names, the
attention of each block an ``nn.MultiheadAttention``. collapse-probe cannot rebuild it from a checkpoint alone (no
library layout), so its code is passed along:

    collapse-probe similarity my_vit.pt --model-code tests/examples/my_vit.py --model MyViT \\
        --model-args '{"image_size": 32, "patch": 4, "dim": 64, "depth": 6, "heads": 4, "num_classes": 10}'

tests/test_field_checkpoints.py trains it a few steps, saves ``model.state_dict()`` and runs that command.
"""
import torch
from torch import nn


class PatchEmbedding(nn.Module):
    def __init__(self, image_size, patch, in_ch, dim):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)
        self.n_patches = (image_size // patch) ** 2

    def forward(self, x):
        x = self.conv(x)  # B, dim, H/p, W/p
        return x.flatten(2).transpose(1, 2)  # B, N, dim


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ff = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class MyViT(nn.Module):
    def __init__(self, image_size=32, patch=4, in_ch=3, num_classes=10, dim=64, depth=6, heads=4, mlp_ratio=4.0):
        super().__init__()
        self.patch_embed = PatchEmbedding(image_size, patch, in_ch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, self.patch_embed.n_patches + 1, dim) * 0.02)
        self.encoder = nn.ModuleList([EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.encoder:
            x = block(x)
        return self.fc(self.norm(x[:, 0]))


def my_vit_small(**kwargs):
    """A factory function, as some training scripts have: --model my_vit_small."""
    return MyViT(dim=96, heads=6, **kwargs)
