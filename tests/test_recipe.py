"""Recipe resolution: the official numbers exactly, the auto rules on hand-computed runs, and the user's
settings winning over every recipe."""

import dataclasses
import json

import pytest

from rtdetr.config import TrainConfig, preset
from rtdetr.data.coco import MULTISCALE_SIZES
from rtdetr.engine.recipe import SET_BY_YOU, RunFacts, official_variant, resolve
from rtdetr.engine.schedule import plan_run

COCO_STEPS_PER_EPOCH = 7329  # 117266 train2017 images / 16, rounded down


def facts(variant="r18vd", params=669_085, pretrained=False, steps_per_epoch=125, **kwargs) -> RunFacts:
    """rtdetr_tiny (669,085 trainable parameters with 3 classes) on 2000 images at batch 16 by default."""
    fields = dict(image_size=(320, 320), train_images=steps_per_epoch * 16)
    return RunFacts(variant, params, pretrained=pretrained, steps_per_epoch=steps_per_epoch, **{**fields, **kwargs})


def coco(variant: str, params: int, pretrained: bool = False, **kwargs) -> RunFacts:
    return facts(variant, params, pretrained, COCO_STEPS_PER_EPOCH, image_size=(640, 640), **kwargs)


def test_official_variant_names():
    names = {name: official_variant(preset(name)) for name in ("rtdetr_r18vd", "rtdetr_r34vd", "rtdetr_r50vd_m",
                                                               "rtdetr_r50vd", "rtdetr_r101vd", "rtdetr_tiny")}
    assert names == {"rtdetr_r18vd": "r18vd", "rtdetr_r34vd": "r34vd", "rtdetr_r50vd_m": "r50vd_m",
                     "rtdetr_r50vd": "r50vd", "rtdetr_r101vd": "r101vd", "rtdetr_tiny": "r18vd"}  # fmt: skip


@pytest.mark.parametrize("variant, backbone_lr", [("r18vd", 1e-5), ("r50vd", 1e-5), ("r101vd", 1e-6)])
def test_official_is_todays_official_defaults(variant, backbone_lr):
    config = resolve({"recipe": "official"}, coco(variant, 20_000_000)).config
    chosen = {name: getattr(config, name) for name in ("lr", "backbone_lr", "warmup_steps", "ema_decay", "ema_warmups",
                                                       "stop_epoch", "lr_schedule", "epochs", "eval_interval")}
    assert chosen == {"lr": 1e-4, "backbone_lr": backbone_lr, "warmup_steps": 2000, "ema_decay": 0.9999,
                      "ema_warmups": 2000, "stop_epoch": -1, "lr_schedule": "constant", "epochs": 72,
                      "eval_interval": 1}  # fmt: skip
    # the official v1 parameter groups of the variant, named (what 'auto' picks by depth too)
    assert config.param_groups == variant
    # every other field too, but the loader workers (chosen for the device, not a number of the recipe)
    expected = TrainConfig.for_model(preset(f"rtdetr_{variant}"), recipe="official", param_groups=variant)
    assert config.replace(num_workers=-1) == expected


V2_EXPECTED = {  # variant: (backbone lr, epochs, first epoch without strong augmentation, multi-scale, groups)
    "r18vd": (1e-4, 120, 117, (), "v2_r18vd"),
    "r34vd": (5e-5, 120, 117, MULTISCALE_SIZES, "v2_r34vd"),
    "r50vd_m": (1e-5, 84, 81, MULTISCALE_SIZES, "v2_r50vd"),
    "r50vd": (1e-5, 72, 71, MULTISCALE_SIZES, "v2_r50vd"),
    "r101vd": (1e-6, 72, 71, MULTISCALE_SIZES, "v2_r101vd"),
    "hgnetv2_l": (5e-6, 72, 71, MULTISCALE_SIZES, "v2_r101vd"),
    "hgnetv2_x": (1e-6, 72, 71, MULTISCALE_SIZES, "v2_r101vd"),
    "hgnetv2_h": (5e-6, 72, 71, MULTISCALE_SIZES, "v2_r101vd"),
}


@pytest.mark.parametrize("variant", V2_EXPECTED)
def test_official_v2_per_backbone_numbers(variant):
    config = resolve({"recipe": "official-v2"}, coco(variant, 30_000_000)).config
    backbone_lr, epochs, stop_epoch, multiscale, groups = V2_EXPECTED[variant]
    assert (config.lr, config.backbone_lr) == (1e-4, backbone_lr)  # r18vd: backbone_lr == lr
    assert (config.epochs, config.resolved_stop_epoch, config.multiscale_sizes) == (epochs, stop_epoch, multiscale)
    assert config.param_groups == groups
    assert (config.warmup_steps, config.ema_decay, config.ema_warmups, config.lr_schedule) == (
        2000, 0.9999, 2000, "constant")  # fmt: skip


# the dsp configs (rtdetrv2_*_dsp_*.yml): epochs, first epoch without strong augmentation and multi-scale
V2_DSP_EXPECTED = {"r18vd": (36, 33, ()), "r34vd": (12, 10, MULTISCALE_SIZES), "r50vd_m": (36, 33, MULTISCALE_SIZES),
                   "r50vd": (12, 10, MULTISCALE_SIZES)}  # fmt: skip


@pytest.mark.parametrize("variant", V2_DSP_EXPECTED)
def test_official_v2_discrete_sampling_uses_the_dsp_configs(variant):
    resolution = resolve({"recipe": "official-v2"}, coco(variant, 30_000_000, discrete_sampling=True))
    config = resolution.config
    assert (config.epochs, config.resolved_stop_epoch, config.multiscale_sizes) == V2_DSP_EXPECTED[variant]
    assert config.backbone_lr == V2_EXPECTED[variant][0] and "dsp" in resolution.reasons["epochs"]


def test_official_variant_of_v2_and_hgnetv2_presets():
    names = ("rtdetrv2_r18vd", "rtdetrv2_r50vd_m", "rtdetrv2_hgnetv2_l", "rtdetrv2_hgnetv2_x", "rtdetrv2_hgnetv2_h",
             "rtdetr_hgnetv2_l")  # fmt: skip
    assert [official_variant(preset(n)) for n in names] == ["r18vd", "r50vd_m", "hgnetv2_l", "hgnetv2_x",
                                                            "hgnetv2_h", "hgnetv2_l"]  # fmt: skip


def test_official_v1_has_no_hgnetv2():
    with pytest.raises(ValueError, match="official-v2"):
        resolve({"recipe": "official"}, coco("hgnetv2_l", 32_900_108))


def test_auto_from_scratch_small_model_short_run():
    # 16 epochs x 125 steps = 2000 steps: warmup 3% = 60, EMA horizon <= 2000 / 16 = 125 -> 100 (0.99).
    resolution = resolve({"recipe": "auto", "epochs": 16}, facts())
    config, reasons = resolution.config, resolution.reasons
    assert resolution.total_steps == 2000
    assert (config.lr, config.backbone_lr) == (1e-3, 1e-3)
    assert (config.warmup_steps, config.ema_warmups, config.ema_decay) == (60, 60, pytest.approx(0.99))
    assert (config.stop_epoch, config.multiscale_sizes) == (0, ())  # no strong augmentation under 10000 steps
    assert config.lr_schedule == "constant" and "0.776" in reasons["lr_schedule"]  # under 10000 steps: no decay
    assert (config.eval_interval, config.patience) == (1, 0)  # round(16 / 15): 16 evaluations
    assert reasons["epochs"] == SET_BY_YOU and "0.808" in reasons["lr"] and "3%" in reasons["warmup_steps"]


def test_auto_tiny_data_clamps_the_warmup_and_the_ema():
    # 10 epochs of 6 steps = 60 steps: 3% is 2 -> at least 20, but at most 60 // 5 = 12; EMA horizon 10.
    config = resolve({"recipe": "auto", "epochs": 10}, facts(steps_per_epoch=6)).config
    assert (config.warmup_steps, config.ema_warmups, config.ema_decay) == (12, 12, pytest.approx(0.9))


def test_auto_fine_tuning_a_long_run_is_official_like():
    # 72 epochs of COCO = 527688 steps: warmup 3% capped at 2000, EMA horizon capped at 10000,
    # strong augmentation on, off for the last ceil(72 / 20) = 4 epochs, multi-scale on.
    resolution = resolve({"recipe": "auto"}, coco("r50vd", 42_862_860, pretrained=True))
    config = resolution.config
    assert resolution.total_steps == 72 * COCO_STEPS_PER_EPOCH
    assert (config.lr, config.backbone_lr) == (1e-4, pytest.approx(1e-5))
    assert (config.warmup_steps, config.ema_warmups, config.ema_decay) == (2000, 2000, pytest.approx(0.9999))
    assert (config.epochs, config.stop_epoch, config.resolved_stop_epoch) == (72, -4, 68)
    assert config.multiscale_sizes == MULTISCALE_SIZES
    assert config.eval_interval == 5  # round(72 / 15)
    # R101: the official 1e-6 of 1e-4 (0.01 x lr)
    assert resolve({"recipe": "auto"}, coco("r101vd", 76_527_756, True)).config.backbone_lr == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "params, batch, lr",
    [
        (669_085, 16, 1e-3),  # <= 2M: measured
        (5_000_000, 16, 4e-4),  # 1e-3 x 2M / 5M
        (20_085_596, 16, 1e-4),  # R18 size
        (669_085, 64, 2e-3),  # x sqrt(64 / 16)
        (669_085, 4, 5e-4),  # x sqrt(4 / 16)
        (669_085, 1024, 2e-3),  # sqrt(64) = 8, clamped to 2
    ],
)
def test_auto_lr_by_model_size_and_batch(params, batch, lr):
    config = resolve({"recipe": "auto", "batch_size": batch}, facts(params=params)).config
    assert config.lr == pytest.approx(lr) and config.backbone_lr == pytest.approx(lr)  # from scratch: equal


def test_auto_time_budget_derived_positions():
    # 10 min at 0.5 s per step, 10 s per evaluation, 100 steps per epoch. Without evaluations 1200 steps
    # (12 epochs) fit; 5% of the budget pays for 3 evaluations -> every round(12 / 3) = 4 epochs. Then
    # 1160 steps fit: 580 s + 2 periodic evaluations (400, 800) = 600 s; 1161 would need 600.5 s.
    run = facts(steps_per_epoch=100, seconds_per_step=0.5, eval_seconds=10.0)
    # (a run this short keeps a constant lr; the flat-cosine positions are checked with it set)
    resolution = resolve({"recipe": "auto", "time_minutes": 10, "lr_schedule": "flat-cosine"}, run)
    config = resolution.config
    assert (resolution.total_steps, config.epochs, config.eval_interval) == (1160, 12, 4)
    # warmup 3% of 1160 = 34.8 -> 35; EMA horizon <= 1160 / 16 = 72.5 -> 50 (decay 0.98)
    assert (config.warmup_steps, config.ema_warmups, config.ema_decay) == (35, 35, pytest.approx(0.98))
    plan = plan_run(config, resolution.total_steps, run.steps_per_epoch)
    assert (plan.cosine_start, plan.stop_epoch) == (580, 0)
    assert plan.evaluation_steps == (400, 800, 1160)
    budget = resolution.budget
    assert (budget.eval_every, budget.max_steps, budget.planned_total(0.0, 0)) == (400, 0, 1160)


def test_time_budget_with_the_epochs_you_set_and_with_costly_evaluations():
    run = facts(steps_per_epoch=100, seconds_per_step=0.5, eval_seconds=10.0)
    capped = resolve({"recipe": "auto", "time_minutes": 10, "epochs": 5}, run)
    assert (capped.total_steps, capped.config.epochs, capped.budget.max_steps) == (500, 5, 500)
    # One evaluation (100 s) is more than 5% of 600 s: only the final one; all 1200 steps fit.
    costly = resolve({"recipe": "auto", "time_minutes": 10}, dataclasses.replace(run, eval_seconds=100.0))
    assert (costly.total_steps, costly.config.epochs, costly.config.eval_interval) == (1200, 12, 12)
    # The official recipe keeps its 72 epochs as the cap; the budget only ends the run earlier.
    official = resolve({"recipe": "official", "time_minutes": 10}, run)
    assert (official.total_steps, official.budget.max_steps, official.budget.eval_every) == (1000, 7200, 100)


@pytest.mark.parametrize("recipe", ["auto", "official", "official-v2"])
def test_what_you_set_always_wins(recipe):
    mine = {"recipe": recipe, "lr": 3e-4, "backbone_lr": 2e-5, "warmup_steps": 7, "ema_decay": 0.95, "stop_epoch": 2,
            "lr_schedule": "flat-cosine", "epochs": 9, "eval_interval": 3, "weight_decay": 0.05,
            "multiscale_sizes": [256, 320]}  # fmt: skip
    resolution = resolve(mine, coco("r101vd", 76_527_756, pretrained=True))
    for name, value in mine.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(resolution.config, name) == expected, name
        assert resolution.reasons[name] == SET_BY_YOU, name
    assert resolution.total_steps == 9 * COCO_STEPS_PER_EPOCH
    if recipe == "auto":
        assert resolution.config.ema_warmups == 7  # follows the warmup you set


def test_defaults_and_errors():
    assert resolve({}, facts()).config.recipe == TrainConfig.recipe  # today: 'official'
    with pytest.raises(ValueError, match="recipe"):
        resolve({"recipe": "fast"}, facts())
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        resolve({"learning_rate": 1e-3}, facts())
    with pytest.raises(ValueError, match="seconds_per_step"):
        resolve({"recipe": "auto", "time_minutes": 5}, facts())
    with pytest.raises(ValueError, match="variant"):
        facts(variant="r200vd")
    with pytest.raises(ValueError, match="pretrained"):
        facts(class_heads_reinitialised=True)


def test_table_and_record():
    resolution = resolve({"recipe": "auto", "epochs": 16}, facts(pretrained=True, class_heads_reinitialised=True))
    table = resolution.table()
    assert "fine-tuning (class heads re-initialised)" in table and "2000 optimizer steps planned" in table
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:]}
    # a small model (facts(): 0.67M parameters) fine-tunes at the from-scratch lr, backbone included
    assert rows["lr"] == "0.001" and rows["backbone_lr"] == "0.001" and rows["epochs"] == "16"
    record = json.loads(json.dumps(resolution.record()))  # plain types for the checkpoint
    assert record["reasons"] == resolution.reasons and record["total_steps"] == 2000
    assert record["facts"]["class_heads_reinitialised"] is True


def test_loader_workers_follow_the_device_and_the_augmentation():
    from rtdetr.engine.loaders import loader_workers

    assert [loader_workers("cpu", 2, False)[0], loader_workers("cpu", 2, True)[0], loader_workers("cpu", 16, True)[0],
            loader_workers("cuda", 16, False)[0], loader_workers("cuda", 2, True)[0]] == [0, 1, 4, 4, 2]  # fmt: skip
    short = resolve({}, RunFacts("r18vd", 1_600_000, (320, 320), 2000, 125, device_type="cpu", cpu_cores=2))
    assert short.config.num_workers == 0 and "main process" in short.reasons["num_workers"]  # 72 epochs, no strong aug
    mine = resolve({"num_workers": 3}, RunFacts("r18vd", 1_600_000, (320, 320), 2000, 125))
    assert mine.config.num_workers == 3 and mine.reasons["num_workers"] == SET_BY_YOU


def test_auto_decays_the_lr_only_in_runs_long_enough_to_converge():
    long = resolve({}, coco("r18vd", 20_000_000)).config  # 72 epochs of COCO: 527,688 steps
    assert (long.lr_schedule, long.flat_fraction, long.min_lr_ratio) == ("flat-cosine", 0.5, 0.05)
    short = resolve({"epochs": 79}, facts()).config  # 9875 steps
    assert short.lr_schedule == "constant"
    assert resolve({"epochs": 80}, facts()).config.lr_schedule == "flat-cosine"  # 10000 steps


@pytest.mark.parametrize(
    "explicit, run, amp",
    [
        ({}, dict(native_bf16=True), "bf16"),  # a CPU with AVX512-BF16 / AMX
        ({}, dict(native_bf16=False), "off"),  # emulated bf16 is slower than fp32
        ({}, dict(device_type="cuda", native_bf16=True), "off"),  # not measured on GPUs
        ({"amp": "off"}, dict(native_bf16=True), "off"),  # the user wins
        ({"amp": "bf16"}, dict(native_bf16=False), "bf16"),
        ({"recipe": "official"}, dict(native_bf16=True), "off"),  # the official fp32 numbers
    ],
)
def test_auto_trains_in_bf16_only_where_the_cpu_has_bf16_instructions(explicit, run, amp):
    from rtdetr.engine.recipe import training_amp

    resolution = resolve(explicit, facts(**run))
    assert resolution.config.amp == amp
    assert training_amp(explicit, facts(**run)) == amp  # what the budget's probe steps are timed with
    if "amp" in explicit:
        assert resolution.reasons["amp"] == SET_BY_YOU
