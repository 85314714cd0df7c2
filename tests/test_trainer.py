"""The trainer: official parameter groups, warmup and EMA arithmetic, fine-tuning head re-initialisation,
atomic checkpoints, exact resume, the CLI, and (slow) overfitting a handful of images."""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest
import torch
from torch import nn

from rtdetr import RTDETR
from rtdetr.config import TrainConfig
from rtdetr.data.coco import CocoDetection
from rtdetr.data.synthetic import generate_coco_dataset
from rtdetr.data.transforms import eval_transforms
from rtdetr.weights import checkpoint as checkpoint_module
from rtdetr.weights.checkpoint import torch_load
from rtdetr.engine.distributed import Rank
from rtdetr.engine.ema import ModelEMA
from rtdetr.engine.optim import LRSchedule, build_optimizer
from rtdetr.engine.run import build_model, split_overrides, train
from rtdetr.engine.trainer import Trainer, check_finite
from rtdetr.cli import train as train_cli
from rtdetr.cli.arguments import parse_settings

# A tiny, fast setup: 64 px images (2x2 + 4x4 + 8x8 = 84 tokens >= 20 queries).
FAST = dict(image_size=(64, 64), num_queries=20, num_denoising=10, num_workers=0, device="cpu", eval_batch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """8 train and 4 val synthetic images, 64 px, COCO layout."""
    return generate_coco_dataset(tmp_path_factory.mktemp("shapes"), {"train": 8, "val": 4}, image_size=(64, 64))


# ---- optimizer, warmup, EMA -----------------------------------------------------------------------------


def group_counts(preset: str, **settings) -> dict[tuple[float, float], int]:
    model = RTDETR.from_preset(preset)
    optimizer = build_optimizer(model, model.config, TrainConfig.for_model(model.config, **settings))
    counts: dict[tuple[float, float], int] = {}
    for group in optimizer.param_groups:
        key = (group["lr"], group["weight_decay"])
        counts[key] = counts.get(key, 0) + len(group["params"])
    return counts


def test_param_groups_match_the_official_r18vd_config():
    # facts section 9, measured with the official `cfg.optimizer`
    assert group_counts("rtdetr_r18vd") == {(1e-5, 0.0): 46, (1e-5, 1e-4): 23, (1e-4, 0.0): 159, (1e-4, 1e-4): 98}


def test_param_groups_match_the_official_r50vd_config():
    # backbone 52; encoder wd-0 83 and decoder wd-0 122 (two official groups with equal settings); rest 130
    assert group_counts("rtdetr_r50vd") == {(1e-5, 1e-4): 52, (1e-4, 0.0): 83 + 122, (1e-4, 1e-4): 130}


# (lr, weight decay): parameters per group, counted with the official v2 code's `cfg.optimizer` (2026-12-04)
V2_GROUP_COUNTS = {
    "rtdetrv2_r18vd": ("v2_r18vd", 1e-4, {(1e-4, 0.0): 162, (1e-4, 1e-4): 164}),
    "rtdetrv2_r34vd": ("v2_r34vd", 5e-5, {(5e-5, 1e-4): 39, (5e-5, 0.0): 78, (1e-4, 0.0): 181, (1e-4, 1e-4): 106}),
    "rtdetrv2_r50vd_m": ("v2_r50vd", 1e-5, {(1e-5, 1e-4): 52, (1e-4, 0.0): 134, (1e-4, 1e-4): 213}),
    "rtdetrv2_hgnetv2_l": ("v2_r101vd", 5e-6, {(5e-6, 1e-4): 75, (1e-4, 0.0): 126, (1e-4, 1e-4): 209}),
}


@pytest.mark.parametrize("preset", V2_GROUP_COUNTS)
def test_param_groups_match_the_official_v2_configs(preset):
    """The v2 patterns are written for the v2 code's names (`encoder.input_proj.0.norm.weight`): matched against
    ours (`.1.weight`) 8 norm tensors would keep their weight decay."""
    groups, backbone_lr, expected = V2_GROUP_COUNTS[preset]
    assert group_counts(preset, param_groups=groups, backbone_lr=backbone_lr) == expected


def test_r101vd_backbone_lr_is_the_official_1e_6():
    assert TrainConfig.for_model(RTDETR.from_preset("rtdetr_tiny").config.replace(depth=101)).backbone_lr == 1e-6


def test_lr_schedule_warmup_and_milestones_on_hand_computed_steps():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]

    def optimizer():
        return torch.optim.AdamW([{"params": params[:1], "lr": 1e-4}, {"params": params[1:], "lr": 1e-5}])

    adamw = optimizer()
    schedule = LRSchedule(adamw, warmup_steps=4, milestones=(2,), gamma=0.1)
    seen = []
    for epoch in range(3):
        schedule.set_epoch(epoch)
        for _ in range(2):  # 2 optimizer steps per epoch
            seen.append([g["lr"] for g in adamw.param_groups])  # the lr this step uses
            schedule.step()
    # step k uses base * min(1, (k + 1) / 4), times 0.1 from epoch 2 on
    factors = (0.25, 0.5, 0.75, 1.0, 0.1, 0.1)
    for got, factor in zip(seen, factors):
        assert got == pytest.approx([1e-4 * factor, 1e-5 * factor], rel=1e-12)
    # A resumed schedule continues where it stopped.
    fresh = optimizer()
    resumed = LRSchedule(fresh, warmup_steps=4, milestones=(2,))
    resumed.load_state_dict({**schedule.state_dict(), "last_step": 1, "epoch": 0})
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.5e-4, 0.5e-5], rel=1e-12)


def test_ema_formula_on_a_hand_computed_case():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, warmups=2)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    d1 = 0.9 * (1 - math.exp(-1 / 2))  # = 0.354122...
    assert ema.module[0].weight.item() == pytest.approx(d1 * 1.0 + (1 - d1) * 3.0, rel=1e-6)
    assert ema.module[1].running_mean.item() == pytest.approx((1 - d1) * 2.0, rel=1e-6)  # BN buffers too
    assert ema.module[1].num_batches_tracked.item() == 0  # integer buffers are not averaged
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    ema.update(model)
    d2 = 0.9 * (1 - math.exp(-2 / 2))
    first = d1 * 1.0 + (1 - d1) * 3.0
    assert ema.module[0].weight.item() == pytest.approx(d2 * first + (1 - d2) * 5.0, rel=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ---- configuration --------------------------------------------------------------------------------------


def test_overrides_are_split_by_dataclass_and_type_checked():
    train_over, model_over = split_overrides({"lr": 2e-4, "epochs": 3, "num_queries": 50, "multiscale_sizes": [256]})
    assert train_over == {"lr": 2e-4, "epochs": 3, "multiscale_sizes": (256,)}
    assert model_over == {"num_queries": 50}
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        split_overrides({"learning_rate": 1e-4})
    with pytest.raises(TypeError, match="TrainConfig.epochs"):
        split_overrides({"epochs": "ten"})
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    assert parse_settings(["lr=2e-4", "amp=bf16", "sync_bn=false", "multiscale_sizes=[576, 608]"]) == {
        "lr": 2e-4, "amp": "bf16", "sync_bn": False, "multiscale_sizes": [576, 608]
    }  # fmt: skip


def test_a_non_finite_loss_stops_training_naming_the_terms():
    with pytest.raises(FloatingPointError, match=r"step 7 \(loss, loss_giou\)"):
        check_finite({"loss": float("nan"), "loss_vfl": 1.0, "loss_giou": float("inf")}, step=7)


# ---- fine-tuning ----------------------------------------------------------------------------------------

CLASS_HEADS = {
    "decoder.enc_score_head.weight", "decoder.enc_score_head.bias", "decoder.denoising_class_embed.weight",
    "decoder.dec_score_head.0.weight", "decoder.dec_score_head.0.bias",
    "decoder.dec_score_head.1.weight", "decoder.dec_score_head.1.bias",
}  # fmt: skip


def test_fine_tuning_reinitialises_exactly_the_class_heads(tmp_path, caplog):
    source = RTDETR.from_preset("rtdetr_tiny", class_names=["a", "b", "c"])
    source.save(tmp_path / "source.pt")
    names = [f"shape{i}" for i in range(5)]
    with caplog.at_level(logging.INFO, logger="rtdetr.weights.loading"):
        model = build_model("rtdetr_tiny", tmp_path / "source.pt", len(names), {})
    message = next(r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage())
    reported = set(message.split(": ", 1)[1].split(", "))
    assert reported == CLASS_HEADS
    assert model.config.num_classes == 5
    old, new = source.state_dict(), model.state_dict()
    for key in new:
        if key not in CLASS_HEADS:
            assert torch.equal(new[key], old[key]), key
    # Same number of classes: nothing is re-initialised.
    same = build_model(None, tmp_path / "source.pt", 3, {})
    assert all(torch.equal(same.state_dict()[k], v) for k, v in old.items())


def test_fine_tuning_rejects_weights_of_another_architecture(tmp_path):
    RTDETR.from_preset("rtdetr_tiny", num_classes=3).save(tmp_path / "source.pt")
    with pytest.raises(ValueError, match="mis-shaped"):
        build_model("rtdetr_tiny", tmp_path / "source.pt", 3, {"hidden_dim": 32})


# ---- checkpoints and resume -----------------------------------------------------------------------------


def make_trainer(shapes, tmp_path, **overrides) -> Trainer:
    train_set = CocoDetection(shapes / "annotations/instances_train.json", shapes / "train")
    val_set = CocoDetection(shapes / "annotations/instances_val.json", shapes / "val", eval_transforms((64, 64)))
    settings = {**FAST, "output": str(tmp_path), "batch_size": 4, **overrides}
    train_over, model_over = split_overrides(settings)
    model = build_model("rtdetr_tiny", None, len(train_set.class_names), model_over)
    return Trainer(model, TrainConfig.for_model(model.config, **train_over), train_set, val_set,
                   Rank(0, 1, torch.device("cpu")))  # fmt: skip


def test_a_crash_while_saving_leaves_the_previous_last_pt_loadable(shapes, tmp_path, monkeypatch):
    trainer = make_trainer(shapes, tmp_path)
    trainer.save_last()
    before = (tmp_path / "last.pt").read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    trainer.step = 5
    with pytest.raises(OSError, match="disk full"):
        trainer.save_last()
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert torch_load(tmp_path / "last.pt")["step"] == 0
    RTDETR.from_checkpoint(tmp_path / "last.pt")


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def callback(trainer: Trainer) -> None:
        if trainer.step == step:
            raise Interrupt
    return callback


def test_an_interrupted_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(shapes, tmp_path):
    # 3 epochs x 2 optimizer steps of 4 images, each accumulated from 2 passes of 2; strong augmentation
    # and multi-scale (python RNG) in the first two epochs; last.pt every 3 steps; killed after step 4, so
    # the run resumes from step 3 (mid-epoch 2) and redoes step 4.
    settings = dict(FAST, epochs=3, batch_size=4, step_batch_size=2, warmup_steps=4, ema_warmups=2, eval_interval=3,
                    multiscale_sizes=(64, 96), checkpoint_interval=3, log_interval=1)  # fmt: skip
    full = train("rtdetr_tiny", shapes, output=str(tmp_path / "full"), **settings)
    with pytest.raises(Interrupt):
        train("rtdetr_tiny", shapes, output=str(tmp_path / "cut"), callbacks=[interrupt_at(4)], **settings)
    assert torch_load(tmp_path / "cut" / "last.pt")["step"] == 3
    resumed = train(resume=tmp_path / "cut" / "last.pt")
    a, b = torch_load(full / "last.pt"), torch_load(resumed / "last.pt")
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 3
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name}"
    assert a["optimizer"]["param_groups"][-1]["lr"] == b["optimizer"]["param_groups"][-1]["lr"]
    assert a["schedule"] == b["schedule"] and a["ema_updates"] == b["ema_updates"] == 6
    for name, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][name]["exp_avg"])
    steps = [r["step"] for r in map(json.loads, (resumed / "log.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 4, logged before the kill, is not repeated
    assert (full / "best.pt").exists() and (full / "curves.png").stat().st_size > 0


def test_max_steps_stops_mid_epoch_with_a_resumable_last_pt(shapes, tmp_path):
    out = train("rtdetr_tiny", shapes, output=str(tmp_path), epochs=2, max_steps=1, **{**FAST, "batch_size": 4})
    saved = torch_load(out / "last.pt")
    assert (saved["epoch"], saved["step"], saved["step_in_epoch"]) == (0, 1, 1)
    assert not (out / "best.pt").exists()  # no epoch finished, nothing evaluated


def test_bf16_autocast_trains_on_cpu_and_fp16_needs_cuda(shapes, tmp_path):
    trainer = make_trainer(shapes, tmp_path, amp="bf16", max_steps=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert trainer.step == 1
    after = trainer.model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # float32 master weights
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "decoder.enc_score_head.weight" in changed and all(torch.isfinite(after[k]).all() for k in changed)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        make_trainer(shapes, tmp_path, amp="fp16")


# ---- command line ---------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rtdetr")
    train_cli.add(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_then_eval(shapes, tmp_path, capsys):
    settings = ["--set", "num_queries=20", "--set", "num_denoising=10", "--set", "num_workers=0", "--set", "eval_batch_size=8"]
    assert run_cli(["train", "--preset", "rtdetr_tiny", "--data", str(shapes), "--epochs", "1", "--batch-size", "4",
                    "--img-size", "64", "--device", "cpu", "--output", str(tmp_path / "run"), *settings]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert {"last.pt", "best.pt", "log.jsonl", "curves.png"} <= {p.name for p in run.iterdir()}
    assert RTDETR.from_checkpoint(run / "best.pt").config.image_size == (64, 64)
    assert run_cli(["eval", "--weights", str(run / "best.pt"), "--data", str(shapes), "--device", "cpu",
                    "--output", str(tmp_path / "eval")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "AP50" in printed and "AP per class (5)" in printed
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class"}
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    val = json.loads((shapes / "annotations/instances_val.json").read_text())
    assert {p["image_id"] for p in predictions} == {im["id"] for im in val["images"]}
    assert {p["category_id"] for p in predictions} <= {c["id"] for c in val["categories"]}


# ---- learning -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    """8 synthetic images, trained and evaluated on themselves (240 steps, no strong augmentation, a fast EMA):
    AP50 must reach 0.9 (measured: 0.97 after 180 steps, 0.99 after 240)."""
    data = generate_coco_dataset(tmp_path / "data", {"train": 8}, image_size=(128, 128), seed=3)
    ann = data / "annotations/instances_train.json"
    out = train(
        "rtdetr_tiny", train_ann=ann, train_images=data / "train", val_ann=ann, val_images=data / "train",
        output=str(tmp_path / "run"), image_size=(128, 128), epochs=120, batch_size=4, lr=1e-3, backbone_lr=1e-3,
        warmup_steps=10, ema_decay=0.9, ema_warmups=5, stop_epoch=0, eval_interval=40, num_workers=0, device="cpu",
    )  # fmt: skip
    best = torch_load(out / "best.pt")["metrics"]
    assert best["AP50"] >= 0.9, best


def test_channels_last_training_computes_the_same_loss_and_gradients():
    # The trainer runs CPU training channels-last (faster oneDNN convolutions): the layout must not change the math.
    torch.manual_seed(0)
    model = RTDETR.from_preset("rtdetr_tiny", num_classes=3, image_size=(96, 96), num_denoising=0).train()
    images = torch.rand(2, 3, 96, 96)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]  # fmt: skip

    def loss_and_grads(memory_format: torch.memory_format) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        model.to(memory_format=memory_format)
        loss = model.compute_loss(images.contiguous(memory_format=memory_format), targets)["loss"]
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(torch.contiguous_format)
    loss_cl, grads_cl = loss_and_grads(torch.channels_last)
    assert model.backbone.conv1.conv1_1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss_cl == pytest.approx(loss, rel=1e-5)
    assert len(grads_cl) == len(grads)
    # Float summation order differs, and random weights leave near-ties in the top-K query selection that such noise
    # can reorder: gradients agree to 5% of each tensor's scale (the stem's differ by ~1%); 1e-8 absolute for the
    # biases before a BatchNorm, whose gradient is zero up to rounding (~1e-11).
    for a, b in zip(grads, grads_cl):
        assert (b - a).abs().max() <= 5e-2 * a.abs().max() + 1e-8


def test_the_trainer_trains_channels_last_on_cpu(shapes, tmp_path):
    network = build_model("rtdetr_tiny", None, 5, {"image_size": (96, 96)})
    train_set = CocoDetection(shapes / "annotations/instances_train.json", shapes / "train")
    val_set = CocoDetection(shapes / "annotations/instances_val.json", shapes / "val")
    trainer = Trainer(network, TrainConfig(output=str(tmp_path), num_workers=0, batch_size=4), train_set, val_set,
                      Rank(0, 1, torch.device("cpu")))  # fmt: skip
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
