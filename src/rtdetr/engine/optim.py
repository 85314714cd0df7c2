"""AdamW parameter groups by regex (official `optimizer.params`) and the lr schedule (official v2 linear
warmup per iteration, then MultiStepLR per epoch).

The official configs select groups with `re.findall(pattern, name)` over the trainable parameters; what no
pattern selects forms the default group (lr, weight_decay). Each variant's config replaces the include's
list, so the groups differ per variant (official configs `optimizer.yml`); they are reproduced here by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig, TrainConfig
from ..weights.official import official_v2_name


@dataclass(frozen=True)
class GroupRule:
    """Parameters whose name matches `pattern` get the backbone lr (else the base lr) and, if not
    `decay`, weight decay 0."""

    name: str
    pattern: str
    backbone_lr: bool
    decay: bool


OFFICIAL_GROUPS: dict[str, tuple[GroupRule, ...]] = {
    # v1 rtdetr_r18vd_6x_coco.yml
    "r18vd": (
        GroupRule("backbone_norm", r"^(?=.*backbone)(?=.*norm).*$", backbone_lr=True, decay=False),
        GroupRule("backbone", r"^(?=.*backbone)(?!.*norm).*$", backbone_lr=True, decay=True),
        GroupRule("encoder_decoder_norm_bias", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", False, False),
    ),
    # v1 rtdetr_r34vd_6x_coco.yml: the r18vd groups with `norm|bn` alternations
    "r34vd": (
        GroupRule("backbone_norm", r"^(?=.*backbone)(?=.*(?:norm|bn)).*$", backbone_lr=True, decay=False),
        GroupRule("backbone", r"^(?=.*backbone)(?!.*(?:norm|bn)).*$", backbone_lr=True, decay=True),
        GroupRule(
            "encoder_decoder_norm_bias", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", False, False
        ),
    ),
    # v1 include optimizer.yml (r50vd, r50vd_m). Note `norm.*weight`: the encoder's input_proj BatchNorm
    # (`input_proj.i.1.weight`) keeps weight decay, as in the official code.
    "r50vd": (
        GroupRule("backbone", "backbone", backbone_lr=True, decay=True),
        GroupRule("encoder_norm_bias", r"^(?=.*encoder(?=.*bias|.*norm.*weight)).*$", False, False),
        GroupRule("decoder_norm_bias", r"^(?=.*decoder(?=.*bias|.*norm.*weight)).*$", False, False),
    ),
    # v1 rtdetr_r101vd_6x_coco.yml: only the backbone group (lr 1e-6), every tensor keeps weight decay
    "r101vd": (GroupRule("backbone", "backbone", backbone_lr=True, decay=True),),
    # v2 rtdetrv2_r18vd_120e_coco.yml (and sp/dsp): no backbone group (the backbone trains at the base lr)
    "v2_r18vd": (GroupRule("norm", r"^(?=.*(?:norm|bn)).*$", backbone_lr=False, decay=False),),
    # v2 rtdetrv2_r34vd_120e_coco.yml (and dsp), patterns verbatim: `(?=.*norm|bn)` reads "(?=.*norm) or bn"
    "v2_r34vd": (
        GroupRule("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", backbone_lr=True, decay=True),
        GroupRule("backbone_norm", r"^(?=.*backbone)(?=.*norm|bn).*$", backbone_lr=True, decay=False),
        GroupRule(
            "encoder_decoder_norm_bias", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", False, False
        ),
    ),
    # v2 include optimizer.yml (r50vd; r50vd_m the same)
    "v2_r50vd": (
        GroupRule("backbone", r"^(?=.*backbone)(?!.*norm).*$", backbone_lr=True, decay=True),
        GroupRule("encoder_decoder_norm", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", False, False),
    ),
    # v2 rtdetrv2_r101vd_6x_coco.yml and rtdetrv2_hgnetv2_{l,x,h}_6x_coco.yml
    "v2_r101vd": (
        GroupRule("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", backbone_lr=True, decay=True),
        GroupRule("encoder_decoder_norm", r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", False, False),
    ),
}
_BY_DEPTH = {18: "r18vd", 34: "r34vd", 50: "r50vd", 101: "r101vd"}


def official_groups(variant: str, version: int) -> str:
    """The OFFICIAL_GROUPS name of an official variant ('r18vd' .. 'r101vd', 'r50vd_m', 'hgnetv2_l/x/h') in
    the v1 or v2 configs (HGNetv2 exists only in v2; its groups are the v2 r101vd ones)."""
    if variant.startswith("hgnetv2"):
        return "v2_r101vd"
    name = "r50vd" if variant == "r50vd_m" else variant
    return f"v2_{name}" if version == 2 else name


def groups_name(name: str, model_config: ModelConfig) -> str:
    """The OFFICIAL_GROUPS entry `param_groups=name` selects ('auto': the v1 rules of the model's ResNet depth,
    which give the backbone its own lr; for HGNetv2 the v2 rules)."""
    if name == "auto":
        hgnetv2 = model_config.backbone.startswith("hgnetv2")
        name = official_groups(model_config.backbone if hgnetv2 else _BY_DEPTH[model_config.depth], 1)
    if name not in OFFICIAL_GROUPS:
        raise ValueError(f"unknown param_groups '{name}'; choose 'auto' or one of {', '.join(OFFICIAL_GROUPS)}")
    return name


def param_groups(
    model: nn.Module, rules: tuple[GroupRule, ...], lr: float, backbone_lr: float, weight_decay: float,
    v2_names: bool = False,
) -> list[dict]:  # fmt: skip
    """AdamW groups [{name, params, lr, weight_decay}] over the trainable parameters, rule order, then the
    default group; empty groups are left out. A parameter matched by two rules raises (the official code
    would hand it to AdamW twice). `v2_names`: the rules are the v2 configs', written for the v2 code's
    parameter names (`encoder.input_proj.0.norm.weight` where ours say `.1.`): match those."""
    chosen: dict[str, list[tuple[str, nn.Parameter]]] = {rule.name: [] for rule in rules}
    default: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        seen = official_v2_name(name) if v2_names else name
        matches = [rule.name for rule in rules if re.findall(rule.pattern, seen)]
        if len(matches) > 1:
            raise ValueError(f"parameter {name} matches several param groups: {matches}")
        (chosen[matches[0]] if matches else default).append((name, param))
    groups = []
    for rule in rules:
        groups.append(
            {"name": rule.name, "params": chosen[rule.name], "lr": backbone_lr if rule.backbone_lr else lr,
             "weight_decay": weight_decay if rule.decay else 0.0}
        )  # fmt: skip
    groups.append({"name": "default", "params": default, "lr": lr, "weight_decay": weight_decay})
    return [
        {**g, "params": [p for _, p in g["params"]], "param_names": [n for n, _ in g["params"]]}
        for g in groups if g["params"]
    ]  # fmt: skip


def build_optimizer(model: nn.Module, model_config: ModelConfig, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the official parameter groups of `config.param_groups`."""
    name = groups_name(config.param_groups, model_config)
    groups = param_groups(model, OFFICIAL_GROUPS[name], config.lr, config.backbone_lr, config.weight_decay,
                          v2_names=name.startswith("v2_"))  # fmt: skip
    # The fused kernel (CPU and CUDA): one call per tensor instead of ~10 (demo model on 2 cores: 2 ms per
    # step instead of 15).
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay, fused=fused
    )


class LRSchedule:
    """The lr of optimizer step n = last_step + 1 (1-based) in epoch e, for every group:

        base_lr * min(1, n / warmup_steps) * gamma ** (number of milestones <= e) * decay(n)

    Official v2: `LinearWarmup` per iteration (the factor for step 1 applied at construction, `step()` after
    each optimizer step) and `MultiStepLR` per epoch, whose milestone (1000) never fires within the published
    schedules, so the official lr is constant after warmup (shape 'constant': decay = 1, milestones=()).

    Shape 'flat-cosine' (the shape of DEIM's FlatCosineLRScheduler): decay = 1 for the first
    `cosine_start` = round(flat_fraction * total_steps) steps, then m + (1 - m) * (1 + cos(phase)) / 2 with
    m = min_lr_ratio, the phase rising linearly from 0 at `cosine_start` to pi at step `total_steps` (so the
    last step runs at m * base_lr) and staying at pi after it. (DEIM ends its cosine where its epochs without
    augmentation begin and holds the floor through them.)

    A time-budgeted run re-estimates its total: `set_total_steps` moves the end of the decay and keeps the lr
    continuous. While still flat the cosine start is recomputed from the new total (never before the current
    step); inside the cosine the decay restarts at the current step from the current phase, so the phase
    then rises linearly from there to pi at the new total.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        shape: str = "constant",
        total_steps: int = 0,
        flat_fraction: float = 0.5,
        min_lr_ratio: float = 0.05,
    ) -> None:
        if shape not in TrainConfig.LR_SCHEDULES:
            raise ValueError(f"LRSchedule shape must be one of {TrainConfig.LR_SCHEDULES}, got {shape!r}")
        if shape == "flat-cosine" and total_steps < 1:
            raise ValueError(f"the flat-cosine lr schedule needs total_steps >= 1, got {total_steps}")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.milestones, self.gamma = tuple(milestones), gamma
        self.shape, self.total_steps = shape, total_steps
        self.flat_fraction, self.min_lr_ratio = flat_fraction, min_lr_ratio
        self.cosine_start, self.start_phase = self.flat_steps(total_steps, flat_fraction), 0.0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_step = self.epoch = 0
        self._apply()

    @staticmethod
    def flat_steps(total_steps: int, flat_fraction: float) -> int:
        """The optimizer steps at the full lr before the cosine decay of a run of `total_steps`."""
        return round(flat_fraction * total_steps)

    def factor(self) -> float:
        """The multiplier of the base lrs for the next optimizer step."""
        n = self.last_step + 1
        warmup = 1.0 if self.warmup_steps <= 0 else min(1.0, n / self.warmup_steps)
        return warmup * self.gamma ** sum(self.epoch >= m for m in self.milestones) * self.decay(n)

    def decay(self, n: int) -> float:
        """The flat-cosine multiplier of step n (1 for the constant shape)."""
        if self.shape == "constant":
            return 1.0
        m = self.min_lr_ratio
        return m + (1 - m) * (1 + math.cos(self.phase(n))) / 2

    def phase(self, n: int) -> float:
        """The cosine phase of step n: `start_phase` up to `cosine_start`, then linear to pi at `total_steps`."""
        if n <= self.cosine_start:
            return self.start_phase
        progress = min(1.0, (n - self.cosine_start) / max(self.total_steps - self.cosine_start, 1))
        return self.start_phase + (math.pi - self.start_phase) * progress

    def set_total_steps(self, total_steps: int) -> None:
        """A new estimate of the run's optimizer steps (time budget); the current step keeps its lr."""
        n = self.last_step + 1
        if self.start_phase == 0.0 and n <= self.cosine_start:  # still flat: the decay starts later or now
            self.cosine_start = max(n, self.flat_steps(total_steps, self.flat_fraction))
        else:  # decaying: continue from the current phase, reaching pi at the new total
            self.start_phase, self.cosine_start = self.phase(n), n
        self.total_steps = total_steps
        self._apply()

    def step(self) -> None:
        """After each optimizer step."""
        self.last_step += 1
        self._apply()

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch."""
        self.epoch = epoch
        self._apply()

    def _apply(self) -> None:
        factor = self.factor()
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def state_dict(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "milestones": list(self.milestones), "gamma": self.gamma,
                "base_lrs": list(self.base_lrs), "last_step": self.last_step, "epoch": self.epoch,
                "shape": self.shape, "total_steps": self.total_steps, "flat_fraction": self.flat_fraction,
                "min_lr_ratio": self.min_lr_ratio, "cosine_start": self.cosine_start,
                "start_phase": self.start_phase}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps, self.gamma = state["warmup_steps"], state["gamma"]
        self.milestones = tuple(state["milestones"])
        self.base_lrs, self.last_step, self.epoch = state["base_lrs"], state["last_step"], state["epoch"]
        # Checkpoints written before the flat-cosine shape existed had a constant lr after warmup.
        self.shape = state.get("shape", "constant")
        self.total_steps, self.flat_fraction = state.get("total_steps", 0), state.get("flat_fraction", 0.5)
        self.min_lr_ratio = state.get("min_lr_ratio", 0.05)
        self.cosine_start, self.start_phase = state.get("cosine_start", 0), state.get("start_phase", 0.0)
        self._apply()
