"""The RT-DETR network: backbone -> efficient hybrid encoder -> decoder (paper Fig. 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .backbone import PResNet
from .decoder import RTDETRDecoder
from .hgnetv2 import HGNetv2
from .hybrid_encoder import CSPRepLayer, HybridEncoder, RepVggBlock
from .layers import fold_conv_batch_norms


class RTDETRModel(nn.Module):
    """Images [B, 3, H, W] RGB in [0, 1] (H, W multiples of 32) -> decoder outputs (see `RTDETRDecoder`).

    Submodules are assigned backbone, decoder, encoder, the official order, so state_dict keys and order
    equal the official v1 checkpoints'. `config` is kept (read-only) for whoever saves or describes the model.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = self.config = config
        self.backbone = build_backbone(c)
        self.decoder = RTDETRDecoder(
            num_classes=c.num_classes,
            in_channels=[c.encoder_hidden_dim] * 3,
            hidden_dim=c.hidden_dim,
            num_queries=c.num_queries,
            num_layers=c.num_decoder_layers,
            nhead=c.decoder_heads,
            dim_feedforward=c.decoder_ffn_dim,
            num_points=c.num_points,
            num_denoising=c.num_denoising,
            label_noise_ratio=c.label_noise_ratio,
            box_noise_scale=c.box_noise_scale,
            eval_idx=c.eval_idx,
            cross_attn_method=c.cross_attn_method,
            offset_scale=c.offset_scale,
            query_select_method=c.query_select_method,
        )
        self.encoder = HybridEncoder(
            in_channels=list(c.backbone_out_channels),
            hidden_dim=c.encoder_hidden_dim,
            nhead=c.encoder_heads,
            dim_feedforward=c.encoder_ffn_dim,
            num_encoder_layers=c.num_encoder_layers,
            expansion=c.expansion,
            depth_mult=c.depth_mult,
            pe_temperature=c.pe_temperature,
        )

    def describe(self) -> str:
        """'R18 (256-d encoder, 3 decoder layers, 80 classes)'; 'v2 HGNetv2-L (...)' for RT-DETRv2 models."""
        c = self.config
        backbone = f"HGNetv2-{c.backbone[-1].upper()}" if c.backbone.startswith("hgnetv2") else f"R{c.depth}"
        sampling = ", discrete sampling" if c.cross_attn_method == "discrete" else ""
        return (f"{'v2 ' if c.version == 2 else ''}{backbone} ({c.encoder_hidden_dim}-d encoder, "
                f"{c.num_decoder_layers} decoder layers{sampling}, {c.num_classes} classes)")  # fmt: skip

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict:
        if images.shape[-2] % 32 or images.shape[-1] % 32:
            raise ValueError(f"image height and width must be multiples of 32, got {tuple(images.shape[-2:])}")
        return self.decoder(self.encoder(self.backbone(images)), targets)

    @torch.no_grad()
    def deploy(self) -> "RTDETRModel":
        """Switch to eval and re-parameterise for inference, in place: every RepVGG block becomes one 3x3 conv,
        each CSP block's two input convs become one per input part (no concatenation), the BatchNorm after each
        remaining conv is folded into it, and conv weights go channels-last.
        Outputs are unchanged."""
        self.eval()
        for module in list(self.modules()):
            if isinstance(module, (RepVggBlock, CSPRepLayer)):
                module.fuse()
        fold_conv_batch_norms(self)
        # NHWC conv weights make oneDNN run the convolutions channels-last: ~15% faster on CPU (r18vd, 640 px).
        return self.to(memory_format=torch.channels_last)


def build_backbone(config: ModelConfig) -> nn.Module:
    """The backbone `config.backbone` names; it returns the stride 8, 16, 32 feature maps of
    `config.backbone_out_channels` channels."""
    c = config
    if c.backbone == "resnet_vd":
        return PResNet(c.depth, c.stem_channels, c.stage_channels, c.stage_blocks, c.freeze_at, c.freeze_norm)
    if c.backbone.startswith("hgnetv2_"):
        return HGNetv2(c.backbone.removeprefix("hgnetv2_").upper(), c.use_lab, c.freeze_at, c.freeze_norm)
    raise ValueError(f"unknown backbone {c.backbone!r}")
