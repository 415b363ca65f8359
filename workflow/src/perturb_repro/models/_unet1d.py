"""A 1-D U-Net in the style of OpenAI's guided-diffusion ``UNetModel`` (Dhariwal & Nichol 2021).

Written for PRiMeFlow (``primeflow.py``), which treats a cell's gene vector as a 1-D sequence (genes
are positions, features are channels). The layout follows guided-diffusion's ``unet.py``:

* input blocks: a 3-wide conv, then per level ``num_res_blocks`` ResBlocks (+ an attention block
  when the level's downsample rate is in ``attention_resolutions``) and, except at the last level,
  a downsampling layer (strided conv when ``conv_resample`` else average pooling);
* a middle block ResBlock -> attention -> ResBlock;
* output blocks mirroring the input blocks with ``num_res_blocks + 1`` ResBlocks per level, each
  fed the matching input-block activation through a skip connection (channel concatenation), and
  an upsampling layer (nearest + conv when ``conv_resample``) closing every level but the first;
* an output head GroupNorm -> SiLU -> zero-initialised conv.

Each ResBlock is GroupNorm -> SiLU -> conv, plus a projection of the conditioning embedding
(time + condition, computed by the caller) added to the features (or used as a FiLM scale/shift
with ``use_scale_shift_norm``), then GroupNorm -> SiLU -> dropout -> zero-initialised conv, and a
residual connection. ``attention_resolutions`` holds downsample *rates* (1, 2, 4, ...) as
guided-diffusion's ``UNetModel`` takes them (its ``script_util`` converts image-size resolutions
into such rates first).

This is an independent re-implementation, not guided-diffusion's code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) scalars: ``[..., dim]`` = [cos(t f_k), sin(t f_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """guided-diffusion normalises with 32 groups (GroupNorm32). Narrow (tiny) layers keep >= 4
    channels per group instead: with one channel per group the normalisation would subtract exactly
    the per-channel offset that carries the time/condition embedding, erasing it. Identical to
    guided-diffusion from 128 channels up (every paper preset)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv1d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool1d(2, 2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv1d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = group_norm(out_channels)
        self.out_rest = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv1d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if out_channels == channels else nn.Conv1d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over sequence positions (here: genes at the block's resolution)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, n = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)  # split qkv before heads (guided-diffusion's "new order")
        q, k, v = (z.reshape(b, self.num_heads, c // self.num_heads, n).transpose(-1, -2) for z in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, per head
        return x + self.proj_out(h.transpose(-1, -2).reshape(b, c, n))


class _EmbedSequential(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet1D(nn.Module):
    """``forward(x [B, in_channels, L], emb [B, emb_channels]) -> [B, out_channels, L]``.

    ``L`` must be a multiple of ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        emb_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_heads: int = 1,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        attention_resolutions = {int(r) for r in attention_resolutions}
        self.downsample_factor = 2 ** (len(channel_mult) - 1)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_EmbedSequential([nn.Conv1d(in_channels, ch, 3, padding=1)])])
        chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, dropout, int(mult * model_channels), use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(_EmbedSequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_EmbedSequential([Downsample(ch, conv_resample)]))
                chans.append(ch)
                ds *= 2

        self.middle_block = _EmbedSequential([
            ResBlock(ch, emb_channels, dropout, use_scale_shift_norm=use_scale_shift_norm),
            AttentionBlock(ch, num_heads),
            ResBlock(ch, emb_channels, dropout, use_scale_shift_norm=use_scale_shift_norm),
        ])

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = chans.pop()
                layers = [ResBlock(ch + skip, emb_channels, dropout, int(model_channels * mult), use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv1d(input_ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.downsample_factor:
            raise ValueError(f"sequence length {x.shape[-1]} is not a multiple of {self.downsample_factor}")
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
