"""Choosing a run's training settings: `resolve(explicit, facts) -> Resolution` (the TrainConfig and, for
every field it chose, the reason why), printed as a table at the start and stored in the checkpoint.

    facts = RunFacts("r18vd", num_parameters=1_597_501, image_size=(160, 160), train_images=2000,
                     steps_per_epoch=125, seconds_per_step=0.34, eval_seconds=3.4)
    resolution = resolve({"recipe": "auto", "time_minutes": 10}, facts)
    print(resolution.table())

Recipes (`TrainConfig.recipe`):
* 'official': the official COCO numbers (v1 `optimizer.yml`, the TrainConfig defaults): lr 1e-4, backbone
  1e-5 (R101 1e-6), warmup 2000, EMA 0.9999 / 2000, 72 epochs, the last one without strong augmentation,
  constant lr.
* 'official-v2': the same with RT-DETRv2's per-backbone lr, epochs and augmentation / multi-scale stops.
* 'auto': fitted to the run (from scratch or fine-tuning, model size, batch, run length). The official
  numbers are tuned for 500k-step COCO runs; a 10-minute CPU run (~1750 steps) that keeps them spends its
  whole length inside the 2000-step warmup and reaches AP 0.000. The rules and their evidence are the
  constants below and the reasons they print.

A field the user set (`explicit`: the overrides by name, as passed to `train`) wins over every recipe; its
reason reads "set by you".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..config import ModelConfig, TrainConfig, check_overrides
from ..data.coco import MULTISCALE_SIZES
from .schedule import TimeBudget, steps_that_fit
from .loaders import loader_workers
from .optim import official_groups

SET_BY_YOU = "set by you"

# ---- the official numbers (v1 `optimizer.yml`, the v2 configs `rtdetrv2_r*vd_*.yml`) --------------------------
OFFICIAL_LR = 1e-4
OFFICIAL_EPOCHS = 72
OFFICIAL_WARMUP = 2000
OFFICIAL_EMA_DECAY, OFFICIAL_EMA_WARMUPS = 0.9999, 2000
V1_BACKBONE_LR = {"r18vd": 1e-5, "r34vd": 1e-5, "r50vd_m": 1e-5, "r50vd": 1e-5, "r101vd": 1e-6}


@dataclass(frozen=True)
class V2Recipe:
    """RT-DETRv2's per-variant numbers: epochs, the last epochs without strong augmentation (and without
    multi-scale, where on), multi-scale on or off, and the backbone lr (R18: the base lr, no separate group)."""

    epochs: int
    clean_epochs: int
    multiscale: bool
    backbone_lr: float


V2_RECIPES = {
    "r18vd": V2Recipe(120, 3, multiscale=False, backbone_lr=1e-4),  # S: `scales: ~`
    "r34vd": V2Recipe(120, 3, multiscale=True, backbone_lr=5e-5),  # M*
    "r50vd_m": V2Recipe(84, 3, multiscale=True, backbone_lr=1e-5),  # M (7x)
    "r50vd": V2Recipe(72, 1, multiscale=True, backbone_lr=1e-5),  # L
    "r101vd": V2Recipe(72, 1, multiscale=True, backbone_lr=1e-6),  # X
    "hgnetv2_l": V2Recipe(72, 1, multiscale=True, backbone_lr=5e-6),
    "hgnetv2_x": V2Recipe(72, 1, multiscale=True, backbone_lr=1e-6),
    "hgnetv2_h": V2Recipe(72, 1, multiscale=True, backbone_lr=5e-6),
}
# The discrete-sampling ("dsp") configs fine-tune their bilinear parent (`tuning:`) for fewer epochs.
V2_DSP_RECIPES = {
    "r18vd": V2Recipe(36, 3, multiscale=False, backbone_lr=1e-4),  # rtdetrv2_r18vd_dsp_3x
    "r34vd": V2Recipe(12, 2, multiscale=True, backbone_lr=5e-5),  # rtdetrv2_r34vd_dsp_1x
    "r50vd_m": V2Recipe(36, 3, multiscale=True, backbone_lr=1e-5),  # rtdetrv2_r50vd_m_dsp_3x
    "r50vd": V2Recipe(12, 2, multiscale=True, backbone_lr=1e-5),  # rtdetrv2_r50vd_dsp_1x
}

# ---- the auto rules -------------------------------------------------------------------------------------
REFERENCE_BATCH = 16  # the official total batch, and the demo's
BATCH_FACTOR_RANGE = (0.25, 2.0)  # lr x sqrt(batch / 16), clamped
SMALL_MODEL, LARGE_MODEL = 2_000_000, 20_000_000  # trainable parameters (demo model 1.6M; R18 20.1M)
SMALL_MODEL_LR, LARGE_MODEL_LR = 1e-3, 1e-4  # from scratch, batch 16
WARMUP_PERCENT, WARMUP_RANGE = 3, (20, 2000)
EMA_HORIZONS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)  # steps averaged: 1 / (1 - decay)
EMA_RUN_SHARE = 16  # the horizon is at most 1/16 of the run
STRONG_AUG_STEPS = 10_000  # runs at least this long use strong augmentation...
DECAY_STEPS = 10_000  # ... and a flat-then-cosine lr decay (shorter ones: a constant lr)
CLEAN_EPOCH_SHARE = 20  # ...and end with ceil(epochs / 20) epochs without it
MULTISCALE_STEPS = 50_000
# ~15 evaluations per run, within 5% of a time budget: in the short budgeted runs (constant lr, EMA) AP rose at every
# evaluation, so more of them only take steps away (demo, AMD EPYC Zen 3: 12 x 4.3 s = 10% of its 9 minutes).
EVALUATIONS, EVAL_BUDGET_SHARE = 15, 0.05
FLAT_FRACTION, MIN_LR_RATIO = 0.5, 0.05
BF16_STEP_SPEEDUP = "steps 1.45x faster (rtdetr_tiny, 320 px, AMD EPYC Zen 4 AVX512-BF16: 0.554 s vs 0.800)"
BF16_AP = "AP no lower: demo data, 1000 steps, AP 0.518 / AP50 0.680 in bf16 vs 0.473 / 0.611 in fp32"


@dataclass(frozen=True)
class RunFacts:
    """What the run is, as the trainer knows it before the first step.

    variant: the official variant whose numbers apply (`official_variant(model_config)`; the HGNetv2 names
    'hgnetv2_l' / '_x' / '_h' for v2). num_parameters: trainable parameters. steps_per_epoch: optimizer
    steps per epoch at the run's batch size. pretrained: starts from detector weights (fine-tuning);
    class_heads_reinitialised: their class heads did not fit the dataset's classes. seconds_per_step and
    eval_seconds: estimates for a time-budgeted run (e.g. timed probe steps, `guess_eval_seconds`).
    """

    variant: str
    num_parameters: int
    image_size: tuple[int, int]
    train_images: int
    steps_per_epoch: int
    pretrained: bool = False
    class_heads_reinitialised: bool = False
    seconds_per_step: float = 0.0
    eval_seconds: float = 0.0
    device_type: str = "cpu"
    cpu_cores: int = 1
    discrete_sampling: bool = False  # the model samples with cross_attn_method 'discrete' (v2 dsp)
    native_bf16: bool = False  # the device runs bf16 in hardware (`config.native_bf16`)

    def __post_init__(self) -> None:
        if self.variant not in V2_RECIPES:
            raise ValueError(f"RunFacts.variant must be one of {', '.join(V2_RECIPES)}, got {self.variant!r}")
        if self.steps_per_epoch < 1 or self.num_parameters < 1:
            raise ValueError(
                f"RunFacts needs steps_per_epoch >= 1 and num_parameters >= 1, got {self.steps_per_epoch}, "
                f"{self.num_parameters}"
            )
        if self.class_heads_reinitialised and not self.pretrained:
            raise ValueError("RunFacts.class_heads_reinitialised needs pretrained=True (heads of which weights?)")

    def describe(self) -> str:
        start = "from scratch"
        if self.pretrained:
            start = "fine-tuning" + (" (class heads re-initialised)" if self.class_heads_reinitialised else "")
        return (f"{self.variant}-like, {self.num_parameters / 1e6:.2f}M parameters, {start}, "
                f"{self.train_images} train images, {self.steps_per_epoch} steps per epoch")  # fmt: skip


@dataclass(frozen=True)
class Resolution:
    """The resolved settings: `config`, a reason per field chosen or set (`reasons`), the planned optimizer
    steps (`total_steps`; for a time budget the first estimate) and, for a time budget, the `budget` the
    trainer observes and checkpoints."""

    config: TrainConfig
    reasons: dict[str, str]
    total_steps: int
    facts: RunFacts
    budget: TimeBudget | None

    def table(self) -> str:
        """'setting | value | why' rows, one per chosen or set field."""
        rows = [(name, _show(getattr(self.config, name)), why) for name, why in self.reasons.items()]
        width = [max(len(row[i]) for row in [("setting", "value", ""), *rows]) for i in range(2)]
        lines = [f"run: {self.facts.describe()}; {self.total_steps} optimizer steps planned",
                 f"{'setting':<{width[0]}}  {'value':<{width[1]}}  why"]  # fmt: skip
        lines += [f"{name:<{width[0]}}  {value:<{width[1]}}  {why}" for name, value, why in rows]
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """Plain types for the checkpoint (the config itself is stored as `train_config`)."""
        return {"facts": asdict(self.facts), "reasons": dict(self.reasons), "total_steps": self.total_steps}


def official_variant(model: ModelConfig) -> str:
    """The official variant of `model`: 'r18vd', 'r34vd', 'r50vd_m' (R50 with CCFF expansion 0.5), 'r50vd',
    'r101vd', or the backbone name for HGNetv2 ('hgnetv2_l' ...). Small custom widths (rtdetr_tiny) count as
    their depth's variant."""
    if model.backbone.startswith("hgnetv2"):
        return model.backbone
    if model.depth == 50 and model.expansion < 1.0:
        return "r50vd_m"
    return f"r{model.depth}vd"


def resolve(explicit: dict[str, Any], facts: RunFacts) -> Resolution:
    """The TrainConfig of the run: the recipe `explicit['recipe']` (else the TrainConfig default) fills in
    every field it governs, each field in `explicit` (checked by name and type) keeps the user's value."""
    explicit = check_overrides(TrainConfig, explicit)
    choices = _Choices(explicit)
    recipe = choices.choose("recipe", TrainConfig.recipe, "the default recipe")
    if recipe not in TrainConfig.RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(TrainConfig.RECIPES)}")
    if choices.get("time_minutes") > 0 and facts.seconds_per_step <= 0:
        raise ValueError("a time budget (time_minutes > 0) needs RunFacts.seconds_per_step: time a few probe steps")
    if recipe == "auto":
        total, cap = _auto(choices, facts)
    else:
        total, cap = _official(choices, facts, v2=recipe == "official-v2")
    choices.choose("num_workers", *_loader_workers(choices, facts))
    for name, value in explicit.items():
        choices.choose(name, value, SET_BY_YOU)
    config = TrainConfig(**choices.values)
    budget = None
    if config.time_minutes > 0:
        eval_every = config.eval_interval * facts.steps_per_epoch
        budget = TimeBudget(config.time_minutes, facts.seconds_per_step, facts.eval_seconds, eval_every, cap)
    return Resolution(config, choices.reasons, total, facts, budget)


class _Choices:
    """The values and reasons resolved so far; a field the user set keeps their value and "set by you"."""

    def __init__(self, explicit: dict[str, Any]) -> None:
        self.explicit = explicit
        self.values: dict[str, Any] = {}
        self.reasons: dict[str, str] = {}

    def choose(self, name: str, value: Any, why: str) -> Any:
        if name in self.explicit:
            value, why = self.explicit[name], SET_BY_YOU
        self.values[name], self.reasons[name] = value, why
        return value

    def get(self, name: str) -> Any:
        """The value of `name` chosen so far, else the user's, else the TrainConfig default."""
        return self.values.get(name, self.explicit.get(name, getattr(TrainConfig, name)))


def _loader_workers(c: _Choices, facts: RunFacts) -> tuple[int, str]:
    stop_epoch, epochs = c.get("stop_epoch"), c.get("epochs")
    augmenting = (stop_epoch if stop_epoch >= 0 else epochs + stop_epoch) > 0 or bool(c.get("multiscale_sizes"))
    return loader_workers(facts.device_type, facts.cpu_cores, augmenting)


# ---- official and official-v2 ---------------------------------------------------------------------------


def _official(c: _Choices, facts: RunFacts, v2: bool) -> tuple[int, int]:
    """The official numbers; returns (planned steps, cap on the steps: the official epochs)."""
    epochs = _official_v2_per_variant(c, facts) if v2 else _official_v1_per_variant(c, facts)
    c.choose("lr", OFFICIAL_LR, "official AdamW lr (optimizer.yml), batch 16")
    c.choose("warmup_steps", OFFICIAL_WARMUP, "official v2 LinearWarmup(2000) per optimizer step")
    c.choose("ema_decay", OFFICIAL_EMA_DECAY, "official EMA")
    c.choose("ema_warmups", OFFICIAL_EMA_WARMUPS, "official EMA")
    c.choose("lr_schedule", "constant", "official: the MultiStepLR milestone (1000 epochs) never fires")
    c.choose("eval_interval", 1, "official: every epoch")
    c.choose("patience", 0, "official: no early stopping")
    groups = official_groups(facts.variant, 2 if v2 else 1)
    c.choose("param_groups", groups, f"official {'v2 ' if v2 else ''}{facts.variant} optimizer params")
    cap = epochs * facts.steps_per_epoch
    if c.get("time_minutes") > 0:
        return _fit_budget(c, facts, c.get("eval_interval") * facts.steps_per_epoch, cap), cap
    return cap, cap


def _official_v1_per_variant(c: _Choices, facts: RunFacts) -> int:
    """epochs, stop_epoch, multi-scale and backbone lr of the v1 configs (today's defaults); the epochs."""
    if facts.variant not in V1_BACKBONE_LR:
        raise ValueError(f"the v1 'official' recipe has no {facts.variant}; use recipe='official-v2'")
    c.choose("stop_epoch", -1, "official: the last epoch without strong augmentation and multi-scale")
    c.choose("multiscale_sizes", (), "off, today's default (the official v1 resizes every batch to 480-800 px)")
    c.choose("backbone_lr", V1_BACKBONE_LR[facts.variant], f"official v1 {facts.variant}")
    return c.choose("epochs", OFFICIAL_EPOCHS, "official v1: 72 epochs ('6x') for every variant")


def _official_v2_per_variant(c: _Choices, facts: RunFacts) -> int:
    """epochs, stop_epoch, multi-scale and backbone lr of the RT-DETRv2 configs (the dsp ones for a discrete-
    sampling model); the epochs. The official `policy.epoch` (strong augmentation) and `collate_fn.stop_epoch`
    (multi-scale) are equal in every v2 config: both are `stop_epoch` here."""
    dsp = facts.discrete_sampling and facts.variant in V2_DSP_RECIPES
    v2 = V2_DSP_RECIPES[facts.variant] if dsp else V2_RECIPES[facts.variant]
    config = f"{facts.variant}{' dsp (fine-tunes its bilinear parent)' if dsp else ''}"
    c.choose("stop_epoch", -v2.clean_epochs, f"official v2 {config}: the last {v2.clean_epochs} epoch(s) without "
             "strong augmentation (and multi-scale)")  # fmt: skip
    sizes = _multiscale_sizes(facts.image_size) if v2.multiscale else ()
    why = "official v2: the 480-800 px list (scaled to the image size) until stop_epoch"
    if not v2.multiscale:
        why = f"official v2: none for {config}"
    elif not sizes:
        why = "off: multi-scale needs a square image size"
    c.choose("multiscale_sizes", sizes, why)
    same = " (= lr: no separate backbone lr)" if v2.backbone_lr == OFFICIAL_LR else ""
    c.choose("backbone_lr", v2.backbone_lr, f"official v2 {config}{same}")
    return c.choose("epochs", v2.epochs, f"official v2 {config}")


# ---- auto -----------------------------------------------------------------------------------------------


def _auto(c: _Choices, facts: RunFacts) -> tuple[int, int]:
    """Settings fitted to the run; returns (planned steps, cap on the steps: 0 unless epochs were set)."""
    total, cap = _auto_length(c, facts)
    lr = c.choose("lr", *_auto_lr(facts, c.get("batch_size")))
    c.choose("backbone_lr", *_auto_backbone_lr(facts, lr))
    warmup = c.choose("warmup_steps", *_auto_warmup(total))
    c.choose("ema_warmups", warmup, "as long as the lr warmup (official 2000 and 2000, the demo 50 and 50)")
    c.choose("ema_decay", *_auto_ema_decay(total))
    stop_epoch = c.choose("stop_epoch", *_auto_stop_epoch(total, c.get("epochs")))
    c.choose("multiscale_sizes", *_auto_multiscale(total, stop_epoch != 0, facts.image_size))
    c.choose("lr_schedule", *_auto_lr_schedule(total))
    c.choose("flat_fraction", FLAT_FRACTION, "half the run at the full lr (DEIM: flat until 4 + epochs / 2)")
    c.choose("min_lr_ratio", MIN_LR_RATIO, "a low final lr (DEIM ends at 0.5x, Ultralytics at 0.01x)")
    c.choose("patience", 0, "off: the end of the decay brings gains an early stop would cut")
    c.choose("amp", *_auto_amp(facts))
    return total, cap


def _auto_length(c: _Choices, facts: RunFacts) -> tuple[int, int]:
    """epochs and eval_interval: the default length, or what fits the time budget (with ~15 evaluations
    taking at most 10% of it). Returns (planned steps, cap: the epochs the user set, else 0)."""
    per_epoch = facts.steps_per_epoch
    cap = c.explicit["epochs"] * per_epoch if "epochs" in c.explicit else 0
    if c.get("time_minutes") <= 0:
        epochs = c.choose("epochs", OFFICIAL_EPOCHS, "official '6x' length; set epochs or time_minutes to fit")
        c.choose("eval_interval", max(1, round(epochs / EVALUATIONS)), f"~{EVALUATIONS} evaluations per run")
        return epochs * per_epoch, cap
    seconds = 60.0 * c.get("time_minutes")
    first_epochs = math.ceil(steps_that_fit(seconds, 0, facts.seconds_per_step, 0.0, 0, cap) / per_epoch)
    evaluations = EVALUATIONS
    if facts.eval_seconds > 0:
        evaluations = min(EVALUATIONS, int(EVAL_BUDGET_SHARE * seconds // facts.eval_seconds))
    if evaluations:
        interval = max(1, round(first_epochs / evaluations))
        why = f"~{evaluations} evaluation{'s' * (evaluations > 1)} in the ~{first_epochs} epochs the budget allows"
        why += f" (at most {EVALUATIONS}"
        why += f", within {EVAL_BUDGET_SHARE:.0%} of it at ~{facts.eval_seconds:.3g} s each)"
    else:
        interval = first_epochs
        why = f"only the final evaluation: one takes ~{facts.eval_seconds:.3g} s, over {EVAL_BUDGET_SHARE:.0%} of it"
    c.choose("eval_interval", interval, why)
    total = _fit_budget(c, facts, c.get("eval_interval") * per_epoch, cap)
    c.choose("epochs", math.ceil(total / per_epoch), f"{total} steps fit the budget ({per_epoch} per epoch)")
    return total, cap


def _fit_budget(c: _Choices, facts: RunFacts, eval_every: int, cap: int) -> int:
    """The steps that fit the time budget with the periodic evaluations (the final one follows it)."""
    seconds = 60.0 * c.get("time_minutes")
    return steps_that_fit(seconds, 0, facts.seconds_per_step, facts.eval_seconds, eval_every, cap)


def training_amp(explicit: dict[str, Any], facts: RunFacts) -> str:
    """The amp mode `resolve(explicit, facts)` will choose: the probe steps that time a budgeted run need it."""
    if "amp" in explicit:
        return explicit["amp"]
    return _auto_amp(facts)[0] if explicit.get("recipe", TrainConfig.recipe) == "auto" else TrainConfig.amp


def _auto_amp(facts: RunFacts) -> tuple[str, str]:
    if facts.device_type != "cpu":
        return "off", "fp32 (bf16 / fp16 training not measured on GPUs here; set amp to use them)"
    if not facts.native_bf16:
        return "off", "fp32: this CPU has no bf16 instructions (AVX512-BF16 or AMX), and emulated bf16 is slower"
    return "bf16", (
        f"this CPU has bf16 instructions: bf16 autocast (loss and matching in fp32) {BF16_STEP_SPEEDUP}; "
        f"{BF16_AP}"
    )


def _auto_lr(facts: RunFacts, batch_size: int) -> tuple[float, str]:
    if facts.pretrained and facts.num_parameters <= SMALL_MODEL:
        lr, why = SMALL_MODEL_LR, (
            f"fine-tuning a small model ({facts.num_parameters / 1e6:.2f}M parameters): 1e-3 as from scratch "
            "(measured, 5 min on the digits from our demo-trained weights: AP 0.428 at 1e-3 everywhere, 0.038 at "
            "1e-4 / backbone 1e-5, 0.251 from scratch)"
        )  # fmt: skip
    elif facts.pretrained:
        lr, why = OFFICIAL_LR, "fine-tuning: the official 1e-4 at batch 16 (the official runs start pretrained too)"
    elif facts.num_parameters <= SMALL_MODEL:
        lr, why = SMALL_MODEL_LR, (
            f"from scratch, {facts.num_parameters / 1e6:.2f}M parameters (<= 2M): 1e-3 measured best at batch "
            "16 (demo AP50 0.808; 7e-4 gave 0.740, 2e-3 far worse; rtdetr_tiny on user data 0.33)"
        )
    elif facts.num_parameters >= LARGE_MODEL:
        lr, why = LARGE_MODEL_LR, (
            "from scratch, official size (>= 20M parameters): 1e-4, the lr at which the official encoder and "
            "decoder learn from scratch"
        )
    else:
        lr = SMALL_MODEL_LR * SMALL_MODEL / facts.num_parameters
        why = f"from scratch, {facts.num_parameters / 1e6:.2f}M parameters (2M..20M): 1e-3 x 2M / parameters"
    factor = min(max(math.sqrt(batch_size / REFERENCE_BATCH), BATCH_FACTOR_RANGE[0]), BATCH_FACTOR_RANGE[1])
    if factor != 1.0:
        why += f"; x {factor:.3g} for batch {batch_size}: square-root rule for Adam, clamped to 0.25..2"
    return lr * factor, why


def _auto_backbone_lr(facts: RunFacts, lr: float) -> tuple[float, str]:
    if not facts.pretrained:
        return lr, "= lr: a random backbone must learn as fast as the rest (the runs that learned did; v2 R18 too)"
    if facts.num_parameters <= SMALL_MODEL:
        return lr, "= lr: a small model's backbone adapts at the full lr (the measured fine-tuning run above)"
    # The official v2 ratios are lower for the large backbones (R101 0.01, HGNetv2-L 0.05).
    ratio = min(0.1, V2_RECIPES[facts.variant].backbone_lr / OFFICIAL_LR)
    return lr * ratio, f"{ratio:g} x lr: fine-tuning keeps the pretrained features (official: 1e-5, R101 1e-6)"


def _auto_lr_schedule(total: int) -> tuple[str, str]:
    if total < DECAY_STEPS:
        return "constant", (
            f"constant after warmup: a run under {DECAY_STEPS} steps is still far from converged, and every decay "
            "measured here cost AP (demo, 2 CPU cores: flat-cosine from mid-run to 0.05x gave AP50 0.776 after "
            "2027 steps, a constant lr 0.808 after 1750; a 10x drop for the last 1-2 of 14 epochs -0.005/-0.010)"
        )  # fmt: skip
    return "flat-cosine", (f"flat, then cosine down to min_lr_ratio x lr at the last step ({total} steps: long "
                           "enough to converge; DEIM's FlatCosine shape)")  # fmt: skip


def _auto_warmup(total: int) -> tuple[int, str]:
    steps = min(max(round(WARMUP_PERCENT * total / 100), WARMUP_RANGE[0]), WARMUP_RANGE[1])
    why = (f"{WARMUP_PERCENT}% of the {total}-step run within {WARMUP_RANGE[0]}..{WARMUP_RANGE[1]} "
           "(official 2000 of ~528k steps; the 10-minute runs that learned used 50 of ~1750)")  # fmt: skip
    if steps > max(total // 5, 1):
        steps, why = max(total // 5, 1), why + ", at most a fifth of the run"
    return steps, why


def _auto_ema_decay(total: int) -> tuple[float, str]:
    horizon = max([h for h in EMA_HORIZONS if h * EMA_RUN_SHARE <= total], default=EMA_HORIZONS[0])
    why = (f"averages ~{horizon} steps (1 / (1 - decay)), the longest of {EMA_HORIZONS[0]}..{EMA_HORIZONS[-1]} "
           f"within 1/{EMA_RUN_SHARE} of the run (demo 0.99: 100 of 1750 steps; official 0.9999: 10000 of ~528k)")
    return 1.0 - 1.0 / horizon, why


def _auto_stop_epoch(total: int, epochs: int) -> tuple[int, str]:
    if total < STRONG_AUG_STEPS:
        return 0, (f"no strong augmentation: under {STRONG_AUG_STEPS} steps the runs learned faster without "
                   "(demo AP50 0.808 and rtdetr_tiny 0.33 both without it)")  # fmt: skip
    tail = -(-epochs // CLEAN_EPOCH_SHARE)
    return -tail, (f"strong augmentation on ({total} steps), off for the last {tail} of {epochs} epochs (~5%; "
                   "official v2: the last 1-3)")  # fmt: skip


def _auto_multiscale(total: int, strong: bool, image_size: tuple[int, int]) -> tuple[tuple[int, ...], str]:
    sizes = _multiscale_sizes(image_size)
    if total < MULTISCALE_STEPS:
        return (), f"off: the run has fewer than {MULTISCALE_STEPS} steps (official v2 S has none even at 120 epochs)"
    if not strong or not sizes:
        return (), "off: " + ("no strong augmentation" if not strong else "the image size is not square")
    return sizes, f"the official 480-800 px list scaled to {image_size[0]} px, until stop_epoch ({total} steps)"


def _multiscale_sizes(image_size: tuple[int, int]) -> tuple[int, ...]:
    """The official multi-scale list (for 640 px) scaled to a square `image_size`, in multiples of 32
    (halves rounded up); () for a non-square size."""
    height, width = image_size
    if height != width:
        return ()
    return tuple(32 * math.floor(size * height / (640 * 32) + 0.5) for size in MULTISCALE_SIZES)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(list(value)) if isinstance(value, tuple) else str(value)
