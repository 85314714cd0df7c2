"""Fixtures shared by the training tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU spinning OpenMP threads slow a
    step down by up to 10x: train these tests on one thread (`pytestmark = pytest.mark.usefixtures(...)`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """(best.pt, dataset folder) of rtdetr_tiny trained for 160 steps on 8 synthetic 96 px images and validated on
    the same images (val = train): a model whose detections mean something (measured AP 0.53, AP50 0.79), for the
    tests that compare exported artifacts' AP with PyTorch's. About a minute on 2 cores."""
    from rtdetr.data.synthetic import generate_coco_dataset
    from rtdetr.engine.run import train

    root = tmp_path_factory.mktemp("trained_tiny")
    data = generate_coco_dataset(root / "data", {"train": 8}, image_size=(96, 96), seed=3)
    (data / "annotations" / "instances_val.json").write_text((data / "annotations" / "instances_train.json").read_text())
    (data / "val").symlink_to(data / "train", target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train(
            "rtdetr_tiny", data, output=str(root / "run"), image_size=(96, 96), epochs=80, batch_size=4, lr=1e-3,
            backbone_lr=1e-3, warmup_steps=10, ema_decay=0.9, ema_warmups=5, stop_epoch=0, eval_interval=80,
            num_workers=0, device="cpu", num_queries=30, num_denoising=10, check_data=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return out / "best.pt", data
