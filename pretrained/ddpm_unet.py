"""The DDPM U-Net of Ho et al. 2020 in PyTorch, and the key maps between its two published weight formats.

:class:`DDPMUNet` is a port of ``Model`` in ``pesser/pytorch_diffusion`` (``pytorch_diffusion/model.py``), a
line-by-line translation of the authors' TensorFlow network used by the official DDIM and DPM-Solver code.  Its
parameter names are that file's (``temb.dense.0``, ``down.0.block.0.norm1``, ``mid.attn_1.q``, …), so the
``ema_cifar10`` checkpoint loads as is.  Attention uses ``F.scaled_dot_product_attention`` (the same single
head, scale C^−½) and the 1×1 q/k/v/proj convolutions are kept as convolutions, as in the checkpoint.

:func:`diffusers_to_ddpm` renames a diffusers ``UNet2DModel`` state dict with the same architecture
(``google/ddpm-cifar10-32``: block_out_channels 128/256/256/256, attention at 16×16) into these names — the
hub file's old attention names ``query/key/value/proj_attn`` and the current ``to_q/to_k/to_v/to_out.0``
both — and :func:`ddpm_to_diffusers` is its inverse (used to write test fixtures).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDPMUNetConfig", "CIFAR10_CONFIG", "DDPMUNet", "diffusers_to_ddpm", "ddpm_to_diffusers",
           "config_from_diffusers"]


@dataclass(frozen=True)
class DDPMUNetConfig:
    """Hyper-parameters of :class:`DDPMUNet` (the names of ``pesser/pytorch_diffusion``'s ``Model``)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    in_channels: int = 3
    resolution: int = 32
    dropout: float = 0.1


# Ho et al.'s CIFAR-10 model (pesser/pytorch_diffusion's cifar10 config; 35,746,307 parameters).
CIFAR10_CONFIG = DDPMUNetConfig()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the DDPM code: [sin(t·ω_k), cos(t·ω_k)], ω_k = 10000^(−k/(dim/2 − 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm–SiLU–Conv, + time projection, GroupNorm–SiLU–Dropout–Conv, + (1×1-projected) input."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (1×1 convolutions for q, k, v, out)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        # (B, 1, HW, C): one head; SDPA's default scale is C^−½, the original's.
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3×3 convolution after padding right/bottom by one (TensorFlow's 'SAME' for even sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMUNet(nn.Module):
    """Ho et al.'s ε-network: ε_θ(x, t) with x in [−1, 1] and t the step index (0 … 999).

    Args:
        config: the hyper-parameters (default: the CIFAR-10 model).
    """

    def __init__(self, config: DDPMUNetConfig = CIFAR10_CONFIG):
        super().__init__()
        self.config = config
        ch, mult = config.ch, tuple(config.ch_mult)
        self.temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        res = config.resolution
        in_mult = (1,) + mult
        self.down = nn.ModuleList()
        block_in = ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[level], ch * m
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, self.temb_ch, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, self.temb_ch, config.dropout)

        up = []
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * mult[level]
            for i in range(config.num_res_blocks + 1):
                skip = ch * (in_mult[level] if i == config.num_res_blocks else mult[level])
                stage.block.append(ResnetBlock(block_in + skip, block_out, self.temb_ch, config.dropout))
                block_in = block_out
                if res in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, stage)  # self.up[level] is the stage at resolution level `level`
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, t) for x (B, C, H, W) and t (B,) step indices (floats allowed)."""
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](timestep_embedding(t, self.config.ch).to(x.dtype))))
        levels = len(self.config.ch_mult)
        hs = [self.conv_in(x)]
        for level in range(levels):
            stage = self.down[level]
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if level != levels - 1:
                hs.append(stage.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(range(levels)):
            stage = self.up[level]
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -- diffusers <-> DDPM names ----------------------------------------------------------------------------
_RESNET = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2", "conv2": "conv2",
           "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         # the names of diffusers < 0.15, used by the google/ddpm-cifar10-32 hub file
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_1X1 = {"q", "k", "v", "proj_out"}  # Linear (C, C) in diffusers, Conv2d (C, C, 1, 1) here


def config_from_diffusers(config: Mapping) -> DDPMUNetConfig:
    """The :class:`DDPMUNetConfig` of a diffusers ``UNet2DModel`` config, if it is a DDPM U-Net.

    Raises:
        ValueError: the config describes another architecture (the message names the field).
    """
    want = {"act_fn": "silu", "norm_num_groups": 32, "flip_sin_to_cos": False, "freq_shift": 1,
            "downsample_padding": 0, "time_embedding_type": "positional", "center_input_sample": False,
            "mid_block_scale_factor": 1, "attention_head_dim": None, "norm_eps": 1e-6}
    for key, value in want.items():
        if key in config and config[key] != value:
            raise ValueError(f"not a DDPM U-Net: {key} = {config[key]!r}, expected {value!r}")
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise ValueError(f"not a DDPM U-Net: {key} = {config[key]!r} (class conditioning)")
    channels = list(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"} or set(up) - {"UpBlock2D", "AttnUpBlock2D"}:
        raise ValueError(f"not a DDPM U-Net: block types {down} / {up}")
    if [d.startswith("Attn") for d in down] != [u.startswith("Attn") for u in reversed(up)]:
        raise ValueError(f"attention placement differs between down {down} and up {up} blocks")
    size = int(config["sample_size"])
    return DDPMUNetConfig(ch=ch, out_ch=int(config["out_channels"]), ch_mult=tuple(c // ch for c in channels),
                          num_res_blocks=int(config["layers_per_block"]),
                          attn_resolutions=tuple(size >> i for i, d in enumerate(down) if d.startswith("Attn")),
                          in_channels=int(config["in_channels"]), resolution=size)


def diffusers_to_ddpm(state_dict: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict (DDPM architecture, ``levels`` resolutions) to
    :class:`DDPMUNet` names.  Keys it does not know are kept as they are (so a strict load reports them).
    """
    out = {}
    for key, value in state_dict.items():
        new = _diffusers_key_to_ddpm(key, levels)
        if new is None:
            out[key] = value
            continue
        name = new.rsplit(".", 2)
        if len(name) == 3 and name[-2] in _ATTN_1X1 and name[-1] == "weight" and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _diffusers_key_to_ddpm(key: str, levels: int):
    simple = {"time_embedding.linear_1": "temb.dense.0", "time_embedding.linear_2": "temb.dense.1",
              "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
    prefix, _, param = key.rpartition(".")
    if prefix in simple:
        return f"{simple[prefix]}.{param}"
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", prefix)
    if m:
        side, b, kind, j, rest = m.groups()
        level = int(b) if side == "down" else levels - 1 - int(b)
        table, group = (_RESNET, "block") if kind == "resnets" else (_ATTN, "attn")
        return f"{side}.{level}.{group}.{j}.{table[rest]}.{param}" if rest in table else None
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", prefix)
    if m:
        return f"down.{m.group(1)}.downsample.conv.{param}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", prefix)
    if m:
        return f"up.{levels - 1 - int(m.group(1))}.upsample.conv.{param}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", prefix)
    if m:
        kind, j, rest = m.groups()
        if kind == "resnets" and j in ("0", "1") and rest in _RESNET:
            return f"mid.block_{int(j) + 1}.{_RESNET[rest]}.{param}"
        if kind == "attentions" and j == "0" and rest in _ATTN:
            return f"mid.attn_1.{_ATTN[rest]}.{param}"
    return None


def ddpm_to_diffusers(state_dict: Mapping[str, torch.Tensor], levels: int, *, legacy_attention: bool = False
                      ) -> dict[str, torch.Tensor]:
    """The inverse of :func:`diffusers_to_ddpm`: :class:`DDPMUNet` names → diffusers ``UNet2DModel`` names.

    Args:
        legacy_attention: write the old attention names (``query``, ``key``, ``value``, ``proj_attn``) of the
            ``google/ddpm-cifar10-32`` hub file instead of ``to_q`` … ``to_out.0``.
    """
    resnet = {v: k for k, v in _RESNET.items()}
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    if legacy_attention:
        attn.update(q="query", k="key", v="value", proj_out="proj_attn")
    simple = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
              "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    out = {}
    for key, value in state_dict.items():
        prefix, _, param = key.rpartition(".")
        new = None
        if prefix in simple:
            new = f"{simple[prefix]}.{param}"
        elif m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", prefix):
            side, level, group, j, rest = m.groups()
            b = int(level) if side == "down" else levels - 1 - int(level)
            kind, table = ("resnets", resnet) if group == "block" else ("attentions", attn)
            new = f"{side}_blocks.{b}.{kind}.{j}.{table[rest]}.{param}"
        elif m := re.fullmatch(r"down\.(\d+)\.downsample\.conv", prefix):
            new = f"down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
        elif m := re.fullmatch(r"up\.(\d+)\.upsample\.conv", prefix):
            new = f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
        elif m := re.fullmatch(r"mid\.block_([12])\.(.+)", prefix):
            new = f"mid_block.resnets.{int(m.group(1)) - 1}.{resnet[m.group(2)]}.{param}"
        elif m := re.fullmatch(r"mid\.attn_1\.(.+)", prefix):
            new = f"mid_block.attentions.0.{attn[m.group(1)]}.{param}"
        if new is None:
            raise KeyError(f"no diffusers name for DDPM U-Net key {key!r}")
        if value.dim() == 4 and value.shape[2:] == (1, 1) and prefix.rsplit(".", 1)[-1] in _ATTN_1X1:
            value = value[:, :, 0, 0]
        out[new] = value
    return out
