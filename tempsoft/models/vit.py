"""A Vision Transformer for small images (the paper's transformer model).

Patch size = image_size / 8, so every input becomes an 8x8 grid of 64 tokens: patch 4 on
32x32 (CIFAR), patch 8 on 64x64 (Tiny-ImageNet), patch 1 on 8x8 digits. Configuration chosen
for CIFAR-scale data and documented here: width 384, depth 7, 6 heads (64 dimensions each), MLP
ratio 2 (hidden 768), pre-norm blocks, GELU, learned position embeddings, a class token and a
linear head on its final LayerNorm output; about 8.3M parameters, comparable to ResNet-18.
Depth 7 with patch 4 follows the "ViT-Lite-7/4" family that trains from scratch on CIFAR
(Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers", 2021), widened to
ViT-S's 384 dimensions / 64-dimension heads.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import Head

__all__ = ["VisionTransformer", "vit", "vit_tiny", "VIT_CONFIG", "VIT_TINY_CONFIG", "patch_size_for"]

VIT_CONFIG = dict(dim=384, depth=7, heads=6, mlp_ratio=2.0, dropout=0.0)
# For CPU studies: the same layout at width 96 with 3 heads of 32 and depth 4 (0.3M
# parameters, like the CPU preset's CNN); ~670 training images/s on 2 cores, where the
# width-128, depth-6 version managed ~300.
VIT_TINY_CONFIG = dict(dim=96, depth=4, heads=3, mlp_ratio=2.0, dropout=0.0)
TOKENS_PER_SIDE = 8


def patch_size_for(image_size: int) -> int:
    """image_size / 8: 4 for 32x32, 8 for 64x64, 1 for 8x8."""
    if image_size % TOKENS_PER_SIDE != 0:
        raise ValueError(f"vit needs an image size divisible by {TOKENS_PER_SIDE} (patch = "
                         f"size / {TOKENS_PER_SIDE}), got {image_size}")
    return image_size // TOKENS_PER_SIDE


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = (self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
                   .permute(2, 0, 3, 1, 4))
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token.

    Shape:
        (B, in_channels, image_size, image_size) -> (B, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 dim: int = 384, depth: int = 7, heads: int = 6, mlp_ratio: float = 2.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        patch = patch_size_for(image_size)
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = Head(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The parameters the timm/DeiT recipe keeps out of weight decay besides biases and
        LayerNorm weights (which ``decay_free_parameters`` finds by their dimension)."""
        return {"pos_embed", "cls_token"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this vit was built for {self.image_size}x{self.image_size} "
                             f"inputs, got {tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)          # (B, T, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VisionTransformer:
    return VisionTransformer(num_classes, in_channels, image_size, **VIT_CONFIG)


def vit_tiny(num_classes: int = 10, in_channels: int = 3,
             image_size: int = 32) -> VisionTransformer:
    return VisionTransformer(num_classes, in_channels, image_size, **VIT_TINY_CONFIG)
