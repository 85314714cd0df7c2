"""Layers shared by the backbone, the encoder and deploy mode: conv + norm, frozen BatchNorm and BatchNorm folding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Holds weight, bias, running_mean and running_var only (no `num_batches_tracked`, which the official
    checkpoints drop too): y = x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps)).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class ConvNormLayer(nn.Module):
    """Conv2d (no bias, 'same' padding for odd k) -> BatchNorm2d -> optional activation."""

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, act: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


def fold_batch_norm(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias of the conv equal to norm(conv(x)) in eval mode: k * g / s and b - m * g / s, s = sqrt(v + eps)."""
    std = (norm.running_var + norm.eps).sqrt()
    scale = norm.weight / std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    return conv.weight * scale[:, None, None, None], norm.bias + (bias - norm.running_mean) * scale



def freeze_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` (in place) by a FrozenBatchNorm2d with the same values."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norms(child)
    return module


def fold_conv_batch_norms(module: nn.Module) -> None:
    """Fold each BatchNorm that directly follows a Conv2d (ConvNormLayer conv/norm, Sequential conv->norm, and
    HGNetv2's padded conv: a Sequential(ZeroPad2d, Conv2d) followed by its norm)."""
    for child in module.children():
        convs = [(n, m) for n, m in child.named_children()]
        for (name_a, a), (name_b, b) in zip(convs, convs[1:]):
            owner, name = child, name_a
            if isinstance(a, nn.Sequential) and len(a) and isinstance(a[-1], nn.Conv2d):
                owner, name, a = a, str(len(a) - 1), a[-1]
            if isinstance(a, nn.Conv2d) and isinstance(b, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                weight, bias = fold_batch_norm(a, b)
                fused = nn.Conv2d(a.in_channels, a.out_channels, a.kernel_size, a.stride, a.padding,
                                  groups=a.groups, bias=True)  # fmt: skip
                fused.weight.copy_(weight)
                fused.bias.copy_(bias)
                setattr(owner, name, fused.to(device=weight.device, dtype=weight.dtype))
                setattr(child, name_b, nn.Identity())
        fold_conv_batch_norms(child)
