"""Model configuration and the model zoo presets.

`ModelConfig` is the single source of truth for the architecture: presets are frozen instances in a read-only
mapping (`preset(name, **overrides)` returns a new config), checkpoints store `asdict(config)`, and overrides
are applied by field name with type checks.
Values follow the official configs (lyuwenyu/RT-DETR: v1 `rtdetr_pytorch/configs/rtdetr/`, v2
`rtdetrv2_pytorch/configs/rtdetrv2/`).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch


BACKBONES = ("resnet_vd", "hgnetv2_l", "hgnetv2_x", "hgnetv2_h")
HGNETV2_OUT_CHANNELS = (512, 1024, 2048)  # stages 2..4 of HGNetv2 L, X and H alike (official arch tables)


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural hyperparameter of RT-DETR and RT-DETRv2.

    Backbone: ResNet-vd ("PResNet") of `depth` 18/34/50/101, or HGNetv2 L/X/H (RT-DETR-L/X, RT-DETRv2-HGNetv2).
    For ResNet-vd, `stage_channels` and `stem_channels` default to the official widths (64..512, stem 32/64);
    `stage_blocks` overrides the per-depth block counts (used only by the tiny preset). HGNetv2's widths are
    the official arch tables (`models.hgnetv2`); `depth`, `stem_channels`, `stage_*` do not apply to it.

    `version` is the official code line the model follows: 1 (`rtdetr_pytorch`) or 2 (`rtdetrv2_pytorch`). Both
    compute the same function at the default options; v2 adds points per level, `cross_attn_method`,
    `query_select_method` and `offset_scale`, and names some tensors differently in its checkpoints.
    """

    version: int = 1
    # Backbone (returns strides 8/16/32): one of BACKBONES
    backbone: str = "resnet_vd"
    depth: int = 18
    freeze_at: int = -1  # -1: nothing frozen; 0: the stem frozen; k>0: stem and the first k stages
    freeze_norm: bool = False  # every backbone BatchNorm2d -> FrozenBatchNorm2d
    stem_channels: int = 64
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    stage_blocks: tuple[int, ...] | None = None  # None: the official counts for `depth`
    use_lab: bool = False  # HGNetv2: a learnable scale and bias after each activation (official: off for RT-DETR)

    # Efficient hybrid encoder (AIFI + CCFF)
    encoder_hidden_dim: int = 256
    encoder_ffn_dim: int = 1024
    encoder_heads: int = 8
    num_encoder_layers: int = 1
    expansion: float = 0.5
    depth_mult: float = 1.0
    pe_temperature: float = 10000.0

    # Decoder
    hidden_dim: int = 256
    decoder_ffn_dim: int = 1024
    decoder_heads: int = 8
    num_decoder_layers: int = 3
    eval_idx: int = -1  # decoder layer whose head gives the eval output (-1: the last)
    num_points: tuple[int, ...] = (4, 4, 4)  # deformable sampling points per feature level
    cross_attn_method: str = "default"  # v2: 'default' (bilinear) | 'discrete' (nearest cell: the dsp models)
    offset_scale: float = 0.5  # sampling offsets are scaled by ref_wh * offset_scale / P_l (v1: fixed 0.5)
    query_select_method: str = "default"  # v2: 'default' | 'one2many' | 'agnostic' (see decoder.query_selection)
    num_queries: int = 300
    num_classes: int = 80
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0

    # Input size the model was trained for; `predict` resizes to it.
    image_size: tuple[int, int] = (640, 640)  # (height, width)

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the declared types.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        choices = {
            "version": (self.version, (1, 2)),
            "backbone": (self.backbone, BACKBONES),
            "cross_attn_method": (self.cross_attn_method, ("default", "discrete")),
            "query_select_method": (self.query_select_method, ("default", "one2many", "agnostic")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        if self.depth not in (18, 34, 50, 101):
            raise ValueError(f"ModelConfig.depth must be 18, 34, 50 or 101, got {self.depth}")
        if len(self.num_points) != 3:
            raise ValueError(f"ModelConfig.num_points needs one entry per feature level (3), got {self.num_points}")
        check_input_size(self.image_size, self.num_queries)
        if not -self.num_decoder_layers <= self.eval_idx < self.num_decoder_layers:
            raise ValueError(
                f"ModelConfig.eval_idx={self.eval_idx} is outside the {self.num_decoder_layers} decoder layers"
            )

    @property
    def backbone_out_channels(self) -> tuple[int, int, int]:
        """Channels of the backbone's S3, S4, S5 outputs (ResNet bottlenecks expand x4)."""
        if self.backbone.startswith("hgnetv2"):
            return HGNETV2_OUT_CHANNELS
        expansion = 4 if self.depth >= 50 else 1
        return tuple(c * expansion for c in self.stage_channels[1:])  # type: ignore[return-value]

    @property
    def resolved_eval_idx(self) -> int:
        return self.eval_idx % self.num_decoder_layers

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with fields overridden by name; unknown names and wrong types raise."""
        return dataclasses.replace(self, **check_overrides(ModelConfig, overrides))


def encoder_tokens(image_size: tuple[int, int]) -> int:
    """Encoder tokens (query-selection candidates) of an H x W input: the stride 8, 16 and 32 maps' cells."""
    height, width = image_size
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in (8, 16, 32))


def check_input_size(image_size: tuple[int, int], num_queries: int) -> None:
    """Raise ValueError, naming the smallest square size that works, when an input has fewer encoder tokens
    than the decoder selects queries (query selection takes the top `num_queries` tokens)."""
    if any(side <= 0 or side % 32 for side in image_size):
        raise ValueError(f"image size {image_size[0]}x{image_size[1]}: height and width must be multiples of 32")
    tokens = encoder_tokens(image_size)
    if tokens < num_queries:
        smallest = next(side for side in range(32, 100_000, 32) if encoder_tokens((side, side)) >= num_queries)
        raise ValueError(
            f"image size {image_size[0]}x{image_size[1]} gives {tokens} encoder tokens, fewer than the "
            f"{num_queries} queries the decoder selects: use at least {smallest}x{smallest} (or a model with "
            f"num_queries <= {tokens})"
        )


AMP_MODES = ("off", "bf16", "fp16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 runs in hardware on `device`: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX-BF16.
    Elsewhere oneDNN emulates bf16 with fp32 instructions plus conversions, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    capabilities = torch.cpu.get_capabilities() if device.type == "cpu" else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def autocast(device: torch.device | str, amp: str) -> AbstractContextManager:
    """The forward-pass autocast context of an `amp` mode ('off', 'bf16', 'fp16'), for training and inference."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "off":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class TrainConfig:
    """Every training hyperparameter. The field defaults are the official recipe (v1 optimizer.yml, v2
    LinearWarmup, EMA and AMP options; `TrainConfig.for_model` applies the per-variant backbone lr), but a run
    resolves every field you do not set through its `recipe` (`engine.recipe.resolve`; 'auto' by default).

    Batch: `batch_size` images per optimizer step in total (all processes and accumulation passes; official 16).
    Each process runs `step_batch_size` images per forward pass (0: batch_size / world size) and gradients
    accumulate over batch_size / (world size * step_batch_size) passes.
    """

    RECIPES = ("auto", "official", "official-v2")  # see engine/recipe.py
    LR_SCHEDULES = ("constant", "flat-cosine")

    recipe: str = "auto"  # how the fields you do not set are chosen (`engine.recipe.resolve`): 'auto' fits the run
    epochs: int = 72
    time_minutes: float = 0.0  # > 0: a time budget; training and its periodic evaluations end within it
    batch_size: int = 16
    step_batch_size: int = 0
    lr: float = 1e-4
    backbone_lr: float = 1e-5  # 1e-6 for r101vd (official); `for_model` picks it
    weight_decay: float = 1e-4  # 0 on norms/biases: see `param_groups`
    betas: tuple[float, ...] = (0.9, 0.999)
    param_groups: str = "auto"  # official regex groups of 'r18vd', 'r34vd', 'r50vd', 'r101vd'; auto: by depth
    warmup_steps: int = 2000  # linear lr warmup over optimizer steps (v2; v1 has none: 0)
    lr_milestones: tuple[int, ...] = ()  # epochs from which the lr is multiplied by lr_gamma (official: never)
    lr_gamma: float = 0.1
    lr_schedule: str = "constant"  # after warmup: 'constant' (official) | 'flat-cosine' (flat, then cosine)
    flat_fraction: float = 0.5  # flat-cosine: the share of the optimizer steps at the full lr
    min_lr_ratio: float = 0.05  # flat-cosine: the last step's lr as a fraction of the base lr
    ema_decay: float = 0.9999
    ema_warmups: int = 2000  # EMA decay = ema_decay * (1 - exp(-updates / ema_warmups))
    clip_max_norm: float = 0.1  # gradient norm clip (0: off)
    boxes_weight_format: str = "none"  # v2 criterion: 'iou' | 'giou' weights the box terms by match quality
    share_matched_indices: bool = False  # v2 criterion: the aux layers reuse the last layer's matching
    amp: str = "off"  # 'off' | 'bf16' (CPU or CUDA) | 'fp16' (CUDA, with a GradScaler)
    stop_epoch: int = -1  # strong augmentation and multi-scale off from this epoch; negative: from the end
    multiscale_sizes: tuple[int, ...] = ()  # square batch sizes drawn per step; () keeps the image size
    num_workers: int = -1  # loader worker processes; -1: chosen for the device (`engine.loaders.loader_workers`)
    eval_batch_size: int = 32
    eval_interval: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    patience: int = 0  # early stopping: stop after this many evaluations without improvement (0: off)
    min_delta: float = 0.0  # early stopping: an improvement is an AP more than this above the reference
    log_interval: int = 50  # optimizer steps between metrics-log lines
    checkpoint_interval: int = 0  # also write last.pt every this many optimizer steps (0: once per epoch)
    max_steps: int = 0  # stop (after writing last.pt) once this many optimizer steps are done (0: no limit)
    seed: int = 0
    sync_bn: bool = True  # SyncBatchNorm when distributed on CUDA (official)
    skip_bad_images: bool = False
    check_data: bool = True  # run the dataset check (every annotation and image) before training
    device: str = "auto"  # 'auto': cuda if available, else cpu
    processes: int = 1  # training processes this run starts (DDP); 0: chosen for the device (`engine.launch`)
    output: str = "runs/train"

    def __post_init__(self) -> None:
        for name in ("betas", "lr_milestones", "multiscale_sizes"):  # JSON round trips give lists
            setattr(self, name, tuple(getattr(self, name)))
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.processes < 0:
            raise ValueError(f"TrainConfig.processes must be >= 1 (or 0: chosen for the device), got {self.processes}")
        if self.num_workers < -1:
            raise ValueError(f"TrainConfig.num_workers must be >= 0 (or -1: chosen for the device), got {self.num_workers}")
        if self.epochs < 1 or self.batch_size < 1 or self.step_batch_size < 0:
            raise ValueError(
                f"TrainConfig needs epochs >= 1, batch_size >= 1, step_batch_size >= 0; got {self.epochs}, "
                f"{self.batch_size}, {self.step_batch_size}"
            )
        if len(self.betas) != 2:
            raise ValueError(f"TrainConfig.betas needs two values, got {self.betas}")
        if any(size % 32 for size in self.multiscale_sizes):
            raise ValueError(f"TrainConfig.multiscale_sizes must be multiples of 32, got {self.multiscale_sizes}")
        if self.recipe not in self.RECIPES:
            raise ValueError(f"TrainConfig.recipe must be one of {self.RECIPES}, got {self.recipe!r}")
        if self.boxes_weight_format not in ("none", "iou", "giou"):
            raise ValueError(f"TrainConfig.boxes_weight_format must be none, iou or giou; got {self.boxes_weight_format!r}")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule must be one of {self.LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (0.0 <= self.flat_fraction <= 1.0 and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(
                f"TrainConfig.flat_fraction and min_lr_ratio must lie in [0, 1], got {self.flat_fraction}, "
                f"{self.min_lr_ratio}"
            )
        if self.time_minutes < 0 or self.patience < 0 or self.min_delta < 0:
            raise ValueError(
                f"TrainConfig needs time_minutes, patience and min_delta >= 0; got {self.time_minutes}, "
                f"{self.patience}, {self.min_delta}"
            )

    @property
    def resolved_stop_epoch(self) -> int:
        """The first epoch without strong augmentation and multi-scale (official: 71 of 72)."""
        return self.stop_epoch if self.stop_epoch >= 0 else self.epochs + self.stop_epoch

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with fields overridden by name; unknown names and wrong types raise."""
        return dataclasses.replace(self, **check_overrides(TrainConfig, overrides))

    @classmethod
    def for_model(cls, model: ModelConfig, **overrides: Any) -> "TrainConfig":
        """The official recipe for this variant (backbone lr 1e-6 for R101, else 1e-5), then `overrides`."""
        return cls(backbone_lr=1e-6 if model.depth == 101 else 1e-5).replace(**overrides)


def check_overrides(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate `overrides` against the fields of dataclass `cls`; coerce ints to floats and lists to tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for name, value in overrides.items():
        if name not in fields:
            raise ValueError(f"unknown {cls.__name__} field '{name}'; known fields: {', '.join(sorted(fields))}")
        default = getattr(cls(), name) if fields[name].default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, tuple) or default is None:
            ok = value is None or isinstance(value, (list, tuple))
            value = tuple(value) if isinstance(value, list) else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise TypeError(f"{cls.__name__}.{name} expects {type(default).__name__}, got {value!r}")
        checked[name] = value
    return checked


_R50_LIKE = dict(depth=50, freeze_at=0, freeze_norm=True, expansion=1.0, num_decoder_layers=6)
_HGNETV2_L = dict(backbone="hgnetv2_l", freeze_at=0, freeze_norm=True, expansion=1.0, num_decoder_layers=6)
_HGNETV2_X = dict(_HGNETV2_L, backbone="hgnetv2_x", encoder_hidden_dim=384, encoder_ffn_dim=2048)

PRESETS: Mapping[str, ModelConfig] = MappingProxyType({
    "rtdetr_r18vd": ModelConfig(depth=18, expansion=0.5, num_decoder_layers=3),
    "rtdetr_r34vd": ModelConfig(depth=34, expansion=0.5, num_decoder_layers=4),
    "rtdetr_r50vd_m": ModelConfig(**{**_R50_LIKE, "expansion": 0.5, "eval_idx": 2}),
    "rtdetr_r50vd": ModelConfig(**_R50_LIKE),
    "rtdetr_r101vd": ModelConfig(
        **{**_R50_LIKE, "depth": 101, "encoder_hidden_dim": 384, "encoder_ffn_dim": 2048}
    ),
    # RT-DETR-L / -X of the v1 README (HGNetv2 backbones; PaddlePaddle weights): 32 M / 67 M params.
    "rtdetr_hgnetv2_l": ModelConfig(**_HGNETV2_L),
    "rtdetr_hgnetv2_x": ModelConfig(**_HGNETV2_X),
    # RT-DETRv2 (configs/rtdetrv2/*.yml). The sp variants are `num_points=(1, 1, 1)` .. `(3, 3, 3)`, the dsp
    # variants `cross_attn_method="discrete"`.
    "rtdetrv2_r18vd": ModelConfig(version=2, depth=18, expansion=0.5, num_decoder_layers=3),
    "rtdetrv2_r34vd": ModelConfig(version=2, depth=34, expansion=0.5, num_decoder_layers=4),
    "rtdetrv2_r50vd_m": ModelConfig(**{**_R50_LIKE, "version": 2, "expansion": 0.5, "eval_idx": 2}),
    "rtdetrv2_r50vd": ModelConfig(**_R50_LIKE, version=2),
    "rtdetrv2_r101vd": ModelConfig(
        **{**_R50_LIKE, "version": 2, "depth": 101, "encoder_hidden_dim": 384, "encoder_ffn_dim": 2048}
    ),
    "rtdetrv2_hgnetv2_l": ModelConfig(**_HGNETV2_L, version=2),
    "rtdetrv2_hgnetv2_x": ModelConfig(**_HGNETV2_X, version=2),
    "rtdetrv2_hgnetv2_h": ModelConfig(
        **{**_HGNETV2_L, "backbone": "hgnetv2_h", "encoder_hidden_dim": 512, "encoder_ffn_dim": 2048,
           "num_encoder_layers": 2}, version=2,
    ),  # fmt: skip
    # Small widths for CPU training in a budget, the demo and tests (not an official model). The backbone's
    # 32..256 channels trained better in 10 minutes on 2 CPU cores than 16..128 (the demo and a small-object
    # dataset: benchmarks/RESULTS.md).
    "rtdetr_tiny": ModelConfig(
        depth=18,
        stem_channels=16,
        stage_channels=(32, 64, 128, 256),
        stage_blocks=(1, 1, 1, 1),
        encoder_hidden_dim=64,
        encoder_ffn_dim=128,
        encoder_heads=4,
        expansion=0.5,
        depth_mult=0.34,
        hidden_dim=64,
        decoder_ffn_dim=128,
        decoder_heads=4,
        num_decoder_layers=2,
        num_points=(2, 2, 2),
        num_queries=100,
        num_denoising=50,
        image_size=(320, 320),
    ),
})


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset `name` with `overrides` applied by field name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a dataclass config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "preset", "check_overrides", "config_dict"]
