"""InternViT, the vision encoder of InternVL 2.5 (and so of the InternVL-based Sa2VA releases).

A plain pre-norm ViT with a CLS token, learned absolute positions, fused ``qkv``, and per-channel layer scale
(``ls1``/``ls2``) on both residual branches. Parameter names follow the released checkpoints
(``embeddings.{class_embedding, patch_embedding, position_embedding}``,
``encoder.layers.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}``), so ``vision_model.*``
tensors load without renaming. transformers ships InternVL only in its own re-keyed layout, hence this file.

The encoder has no final norm: the last layer's output is what the projector (``mlp1``) reads, after the CLS
token is dropped and the patch grid pixel-shuffled (:func:`pixel_shuffle`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms_norm":
        return _RMSNorm(dim, eps)
    raise ValueError(f"unknown norm_type {kind!r}; expected 'layer_norm' or 'rms_norm'")


class InternVisionEmbeddings(nn.Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int):
        super().__init__()
        self.grid = image_size // patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(3, hidden, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + g*g, D)."""
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        b, d, gh, gw = patches.shape
        x = torch.cat([self.class_embedding.expand(b, 1, d).to(patches.dtype), patches.flatten(2).transpose(1, 2)], 1)
        pos = self.position_embedding
        if (gh, gw) != (self.grid, self.grid):  # another input size: resample the patch positions (bicubic)
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2).to(pos.dtype)], 1)
        return x + pos.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, qkv_bias: bool, qk_norm: bool, norm_type: str, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.proj = nn.Linear(hidden, hidden)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = _norm(norm_type, hidden, eps)
            self.k_norm = _norm(norm_type, hidden, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, d).unbind(2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class InternMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter)
        self.fc2 = nn.Linear(inter, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, eps, kind = c["hidden_size"], c.get("layer_norm_eps", 1e-6), c.get("norm_type", "layer_norm")
        self.attn = InternAttention(d, c["num_attention_heads"], c.get("qkv_bias", True),
                                    c.get("qk_normalization", False), kind, eps)
        self.mlp = InternMLP(d, c["intermediate_size"], c.get("hidden_act", "gelu"))
        self.norm1 = _norm(kind, d, eps)
        self.norm2 = _norm(kind, d, eps)
        self.ls1 = nn.Parameter(torch.full((d,), float(c.get("initializer_factor", 1.0))))
        self.ls2 = nn.Parameter(torch.full((d,), float(c.get("initializer_factor", 1.0))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionLayer(c) for _ in range(c["num_hidden_layers"])])


class InternVisionModel(nn.Module):
    """(B, 3, S, S) ImageNet-normalised pixels -> hidden states of layer ``select_layer`` (B, 1 + g*g, D)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.embeddings = InternVisionEmbeddings(config["hidden_size"], config.get("image_size", 448),
                                                 config.get("patch_size", 14))
        self.encoder = InternVisionEncoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        layers = self.encoder.layers
        stop = select_layer % len(layers) + 1 if select_layer < 0 else select_layer
        for layer in layers[:stop]:
            x = layer(x)
        return x


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """InternVL's token merge: (B, W, H, C) -> (B, H*s, W*s, C/s^2) for s = ``scale`` (0.5 merges 2x2 patches
    into one token of 4C channels). ``v2`` transposes the grid back so tokens stay row-major."""
    b, w, h, c = x.shape
    x = x.reshape(b, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(b, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3)
    return x.contiguous()


def build_mlp1(vision_hidden: int, llm_hidden: int, downsample_ratio: float) -> nn.Sequential:
    """The projector: LayerNorm(4 Dv) -> Linear(4 Dv, H) -> GELU -> Linear(H, H) (keys ``mlp1.{0,1,3}``)."""
    d = vision_hidden * int(1 / downsample_ratio) ** 2
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
