"""Ultralytics RT-DETR-L/X checkpoints (`rtdetr.weights.ultralytics`): read without running their pickle, they
give our model the same eval outputs as Ultralytics' own model.

The parity tests need the `ultralytics` package, a test-only dependency kept out of pyproject: it requires
`opencv-python`, whose `cv2` overwrites our `opencv-python-headless`'s (and removes it when either is uninstalled).
`pip install --no-deps ultralytics` is enough to build its models. Nothing is downloaded: the models are built
from Ultralytics' own `rtdetr-l.yaml` / `rtdetr-x.yaml` with random weights.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from rtdetr import RTDETR
from rtdetr.config import preset
from rtdetr.data.coco_categories import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from rtdetr.weights.ultralytics import PickledObject, load_restricted

CALIBRATION_SIZE = 128  # BatchNorm statistics are measured at this input size (cheap) ...
IMAGE_SIZE = 256  # ... and the outputs compared at this one (1344 encoder tokens for the 300 queries)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory):
    """`ultralytics.nn.tasks`, imported without leaving behind the OMP_NUM_THREADS=1 that `import ultralytics`
    sets when it is unset, and with its settings file in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads())))
        patch.setenv("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-settings")))
        return pytest.importorskip("ultralytics.nn.tasks")


def smooth_images(n: int, size: int, generator: torch.Generator) -> Tensor:
    """[n, 3, size, size] in [0, 1]: upsampled 10x10 noise plus fine noise. Unlike plain noise, it gives deep
    features that vary across the image, so that the encoder scores of different tokens do not tie."""
    coarse = F.interpolate(torch.rand(n, 3, 10, 10, generator=generator), size=(size, size), mode="bilinear")
    return 0.8 * coarse + 0.2 * torch.rand(n, 3, size, size, generator=generator)


@torch.no_grad()
def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Random weights fit for a parity test of an Ultralytics RT-DETR, in place.

    Every BatchNorm gets a random affine (weight U(0.5, 1.5), bias N(0, 0.2)) and the statistics of its input,
    measured in one train-mode pass (momentum 1), with 0.1 added to the variance: exactly calibrated, a random
    network this deep amplifies float rounding ~1e4-fold (channels of tiny variance), which would swamp the
    comparison. Every decoder parameter gets N(0, 0.02) noise (its heads, sampling offsets and attention
    weights start at zero or constants)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = 1.0
        norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.2)
    model.train()
    model.predict(smooth_images(2, CALIBRATION_SIZE, generator))
    for norm in norms:
        norm.running_var.add_(0.1)
    for p in model.model[-1].parameters():
        p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    model.eval()


def save_like_ultralytics(model: nn.Module, path: Path, training: bool = False) -> None:
    """Write `model` as Ultralytics does: the module object itself in fp16, under 'ema' with 'model' None in a
    training checkpoint (`BaseTrainer.save_model`), under 'model' with 'ema' None in a final one
    (`strip_optimizer`, the released rtdetr-l.pt)."""
    half = copy.deepcopy(model).half()
    weights = {"model": None, "ema": half} if training else {"model": half, "ema": None}
    torch.save({"epoch": -1, **weights, "optimizer": None, "train_args": dict(model.args), "version": "test"}, path)


@pytest.fixture(scope="module", params=["l", "x"])
def ultralytics_checkpoint(request: pytest.FixtureRequest, tasks, tmp_path_factory: pytest.TempPathFactory):
    """(variant, Ultralytics model with the weights as saved (fp16 -> float32), its checkpoint file). L: 80 COCO
    classes in a training checkpoint (EMA); X: 5 classes of our own naming in a final one."""
    variant = request.param
    generator = torch.Generator().manual_seed(0)
    num_classes = 80 if variant == "l" else 5
    model = tasks.RTDETRDetectionModel(f"rtdetr-{variant}.yaml", nc=num_classes, verbose=False)
    randomize(model, generator)
    names = COCO_CLASS_NAMES if variant == "l" else [f"part_{i}" for i in range(num_classes)]
    model.names = dict(enumerate(names))
    model.args = {"imgsz": IMAGE_SIZE, "task": "detect"}
    path = tmp_path_factory.mktemp("ultralytics") / f"rtdetr-{variant}.pt"
    save_like_ultralytics(model, path, training=variant == "l")
    # The reference runs on the fp16-rounded weights, as we read them. The file caches the calibration size's
    # anchors (fp16-rounded): the reference regenerates them, in float32, at IMAGE_SIZE, as the official code.
    return variant, copy.deepcopy(model).half().float().eval(), path


def matched_queries(ours: Tensor, theirs: Tensor) -> Tensor:
    """For queries [Q, D] (box and logits) of two models, the order of `theirs` that best matches `ours` (the
    assignment minimising the summed max-abs difference). The decoder is permutation-equivariant over its
    queries, so queries whose encoder scores tie within float noise may come out in either order."""
    cost = (ours[:, None, :] - theirs[None, :, :]).abs().amax(-1)
    rows, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(columns)[torch.as_tensor(rows).argsort()]


@pytest.mark.parametrize("size", [(IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, 384)])
def test_same_eval_outputs_as_ultralytics(ultralytics_checkpoint, size: tuple[int, int]) -> None:
    """Per query, boxes and class logits within 1e-4, on a square and a non-square input (Ultralytics 8.4.190
    builds AIFI's position embedding row-major, as we do; the official order differs on non-square maps)."""
    variant, reference, path = ultralytics_checkpoint
    model = RTDETR.from_checkpoint(path)
    images = F.interpolate(smooth_images(2, IMAGE_SIZE, torch.Generator().manual_seed(1)), size=size, mode="bilinear")
    with torch.no_grad():
        # eval: (post-processed, (boxes [1, B, Q, 4] and logits of the eval layer, encoder outputs, ...))
        _, (boxes, logits, *_) = reference(images)
        ours = model(images)
    theirs = torch.cat([boxes[-1], logits[-1]], -1)
    mine = torch.cat([ours["pred_boxes"], ours["pred_logits"]], -1)
    for b in range(len(images)):
        order = matched_queries(mine[b], theirs[b])
        assert (order == torch.arange(len(order))).float().mean() > 0.95  # the same order up to near-ties
        box_diff = (ours["pred_boxes"][b] - boxes[-1][b][order]).abs().max()
        logit_diff = (ours["pred_logits"][b] - logits[-1][b][order]).abs().max()
        assert box_diff <= TOLERANCE and logit_diff <= TOLERANCE, (variant, box_diff, logit_diff)
    num_classes = reference.model[-1].nc
    assert model.config == preset(f"rtdetr_hgnetv2_{variant}", num_classes=num_classes, image_size=(IMAGE_SIZE,) * 2)
    assert model.class_names == [reference.names[i] for i in range(num_classes)]
    assert model.category_ids == (list(COCO_CATEGORY_IDS) if variant == "l" else list(range(num_classes)))


def test_reading_imports_no_ultralytics_code(ultralytics_checkpoint) -> None:
    """In a fresh interpreter, loading the checkpoint end to end leaves `ultralytics` unimported."""
    _, _, path = ultralytics_checkpoint
    code = (
        "import sys; from rtdetr import RTDETR; RTDETR.from_checkpoint(sys.argv[1]); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'ultralytics'], 'ultralytics was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


class RunsCommand:
    """Unpickling this with plain pickle runs a shell command (`__reduce__` names os.system)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = RunsCommand(f"touch {marker}")
    pickle.loads(pickle.dumps(payload))  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pt"
    # The string makes the file look like an Ultralytics checkpoint, so that loading takes the restricted path.
    torch.save({"model": payload, "ema": None, "note": "ultralytics.nn.tasks"}, path)
    loaded = load_restricted(path)["model"]
    assert isinstance(loaded, PickledObject)
    assert (loaded.type_name, loaded.args) == (f"{os.system.__module__}.system", (f"touch {marker}",))
    with pytest.raises(ValueError, match=r"evil\.pt is not an Ultralytics checkpoint: its model is a .*system"):
        RTDETR.from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("yolov8n.yaml", r"yolov8n\.pt holds an Ultralytics DetectionModel, not an RT-DETR"),
        ("rtdetr-resnet50.yaml", r"rtdetr-resnet50\.pt: the backbone is not an HGNetv2"),
    ],
)
def test_other_ultralytics_models_are_refused_by_name(tasks, tmp_path: Path, yaml: str, message: str) -> None:
    model_class = tasks.RTDETRDetectionModel if yaml.startswith("rtdetr") else tasks.DetectionModel
    model = model_class(yaml, verbose=False)
    model.args = {}
    path = tmp_path / yaml.replace(".yaml", ".pt")
    save_like_ultralytics(model, path)
    with pytest.raises(ValueError, match=message):
        RTDETR.from_checkpoint(path)
