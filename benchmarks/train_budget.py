"""Our default recipe against Ultralytics YOLOv8n, both from scratch, for the same wall-clock budget on the same
machine and the same COCO-format dataset, both scored by the same pycocotools code on the same held-out split.

    python3 benchmarks/train_budget.py --data runs/demo/data datasets/digits --minutes 5 10 20 --img-size 320 \\
        --output runs/budget
    python3 benchmarks/train_budget.py --data /tmp/digits_small --minutes 1 --output /tmp/budget_smoke   # smoke test

Datasets: `rtdetr demo` writes runs/demo/data (coloured shapes); `benchmarks/digits_dataset.py --output
datasets/digits` writes many small handwritten digits on real photos.

Ultralytics is a benchmark-only dependency with its own virtual environment: it pulls opencv-python, which
would clash with the project's opencv-python-headless (both install `cv2`). Nothing is downloaded at run time.

    python3 -m venv benchmarks/.venv-yolo
    echo '*' > benchmarks/.venv-yolo/.gitignore     # keeps the environment (6 GB: torch with CUDA libs) out of git
    benchmarks/.venv-yolo/bin/pip install torch==2.14.1 torchvision==0.29.1 ultralytics pycocotools

Per dataset, per budget and per detector, one run after the other (never two at once), 2 threads each:
* rtdetr: the CLI as a user runs it, with the defaults: `rtdetr train --preset rtdetr_tiny --data DIR --img-size
  320 --time MINUTES`, then `rtdetr eval --weights best.pt --data DIR --split val` (its loader runs in the
  main process on a CPU without strong augmentation, as YOLO's does).
* yolov8n: `YOLO("yolov8n.yaml")`, pretrained=False, its own `time=` budget (hours), batch 16, device cpu, plots
  and amp off (on CPU it loads data in the main process), on a YOLO-layout copy of the dataset that this script
  writes (images linked, labels normalised cx cy w h, class = index of the category id among the sorted ids). It
  runs in the venv through the `--worker yolo-train|yolo-predict` modes of this file, offline (YOLO_OFFLINE, no
  auto-install, settings sync off, Arial.ttf copied from matplotlib's DejaVuSans) and with 2 threads
  (Ultralytics' NUM_THREADS, otherwise cpu_count - 1 = 1 here). Its own defaults otherwise (nbs 64: it
  accumulates 4 batches of 16 per optimizer step).
* scoring: both detectors' detections in COCO results format (ours: `rtdetr eval`'s predictions.json; YOLO's:
  conf 0.001, max_det 100, classes mapped back to category ids) go through `coco_metrics` (pycocotools
  COCOeval, bbox, every val image). Both pick their best.pt on this val split during training, alike.
* train wall time: the whole training subprocess, start to exit (start-up, per-epoch evaluations, checkpoints
  and the final evaluation included), reported next to the budget.

Writes `<output>/results.md` (a table per dataset) and `<output>/results.json`, with the CPU model and core count,
after every run. The top-level imports are the standard library's only: the venv runs this file as the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRESET = "rtdetr_tiny"
DETECTORS = ("rtdetr", "yolov8n")
THREADS = 2
YOLO_BATCH = 16
DEFAULT_YOLO_PYTHON = Path(__file__).resolve().parent / ".venv-yolo" / "bin" / "python"
VENV_HELP = (
    "python3 -m venv benchmarks/.venv-yolo && echo '*' > benchmarks/.venv-yolo/.gitignore && "
    "benchmarks/.venv-yolo/bin/pip install torch==2.14.1 torchvision==0.29.1 ultralytics pycocotools"
)


# ---- running things --------------------------------------------------------------------------------------------


def thread_env(**extra: str) -> dict[str, str]:
    """This process's environment with THREADS OpenMP/MKL threads (and `extra`), for a training subprocess."""
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), **extra}


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `command` with stdout and stderr to `log`; its wall seconds. A failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise RuntimeError(f"exit code {code}: {' '.join(command)}\n(log {log}, last lines:)\n{tail}")
    return seconds


def rtdetr_command(*args: str) -> list[str]:
    """`rtdetr ARGS` through this interpreter (what the `rtdetr` console script runs)."""
    return [sys.executable, "-m", "rtdetr.cli", *args]


def fresh_dir(path: Path) -> Path:
    """`path` emptied (a run folder of an earlier invocation is replaced: its logs would otherwise be appended)."""
    if path.exists():
        print(f"  replacing {path}")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---- datasets --------------------------------------------------------------------------------------------------


def dataset_split(data: Path, split: str) -> tuple[Path, Path, dict]:
    """(annotation file, image folder, the COCO dict) of a split, found as `rtdetr` finds it."""
    from rtdetr.data.coco import find_split

    ann_file, image_dir = find_split(data, split)
    return Path(ann_file), Path(image_dir), json.loads(Path(ann_file).read_text())


def describe_dataset(data: Path) -> dict[str, Any]:
    """Image, box and class counts of the train and val splits."""
    (_, _, train), (_, _, val) = dataset_split(data, "train"), dataset_split(data, "val")
    return {"path": str(data), "train_images": len(train["images"]), "val_images": len(val["images"]),
            "val_boxes": len(val["annotations"]), "classes": len(val["categories"])}  # fmt: skip


def yolo_label_lines(image: dict, annotations: list[dict], class_index: dict[int, int]) -> list[str]:
    """YOLO label rows `class cx cy w h` (normalised to the image, boxes clipped to it) of one image."""
    width, height = image["width"], image["height"]
    lines = []
    for a in annotations:
        x, y, w, h = a["bbox"]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if a.get("iscrowd", 0) or x1 <= x0 or y1 <= y0:
            continue
        cx, cy, bw, bh = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
        lines.append(f"{class_index[a['category_id']]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return lines


def write_yolo_dataset(data: Path, out: Path) -> Path:
    """A YOLO-layout view of the COCO dataset `data` under `out`: images/<split>/ (symlinks to the COCO images),
    labels/<split>/*.txt, and data.yaml (written as JSON, which YAML reads). Class i is the i-th category id in
    sorted order. Returns the yaml's path."""
    names: list[str] | None = None
    for split in ("train", "val"):
        _, image_dir, coco = dataset_split(data, split)
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        split_names = [c["name"] for c in categories]
        if names is not None and split_names != names:
            raise ValueError(f"{data}: train and val have different categories ({names} vs {split_names})")
        names, class_index = split_names, {c["id"]: i for i, c in enumerate(categories)}
        per_image: dict[int, list[dict]] = {image["id"]: [] for image in coco["images"]}
        for annotation in coco["annotations"]:
            per_image[annotation["image_id"]].append(annotation)
        for image in coco["images"]:
            link = out / "images" / split / image["file_name"]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((image_dir / image["file_name"]).resolve())
            label = (out / "labels" / split / image["file_name"]).with_suffix(".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            lines = yolo_label_lines(image, per_image[image["id"]], class_index)
            label.write_text("".join(line + "\n" for line in lines))
    config = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": names}
    (out / "data.yaml").write_text(json.dumps(config, indent=1))
    return out / "data.yaml"


# ---- scoring ---------------------------------------------------------------------------------------------------


def coco_metrics(ann_file: Path, results: list[dict]) -> dict[str, float]:
    """pycocotools COCOeval (bbox, maxDets 1/10/100) of COCO-format `results` over every image of `ann_file`:
    {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"} (-1 where COCOeval finds no ground truth;
    all 0 without any detection). The one scorer of both detectors."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        ground_truth = COCO(str(ann_file))
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        evaluation.params.imgIds = sorted(ground_truth.getImgIds())
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(names, evaluation.stats)}


# ---- rtdetr ----------------------------------------------------------------------------------------------------


def read_last_checkpoint(train_dir: Path) -> dict[str, Any]:
    """Optimizer steps, training seconds (the loop's own clock) and batch size of a run, from its last.pt."""
    from rtdetr.weights.checkpoint import torch_load

    last = torch_load(train_dir / "last.pt")
    return {"steps": int(last["step"]), "train_seconds": float(last["train_seconds"]),
            "batch_size": int(last["train_config"]["batch_size"])}  # fmt: skip


def train_arguments(data: Path, img_size: int, output: Path) -> list[str]:
    return ["train", "--preset", PRESET, "--data", str(data), "--img-size", str(img_size), "--output", str(output)]


def run_rtdetr(data: Path, dataset: dict[str, Any], minutes: float, img_size: int, run_dir: Path) -> dict[str, Any]:
    """Train with `--time minutes` and the defaults, then score best.pt on val. The run's record: budget mode,
    wall minutes, steps, epochs, metrics."""
    train_dir, eval_dir = run_dir / "train", run_dir / "eval"
    args = [*train_arguments(data, img_size, train_dir), "--time", f"{minutes:g}"]
    mode = f"--time {minutes:g}"
    print(f"  rtdetr {' '.join(args)}")
    wall = run_logged(rtdetr_command(*args), run_dir / "train.log", thread_env())
    eval_args = ["eval", "--weights", str(train_dir / "best.pt"), "--data", str(data), "--split", "val",
                 "--output", str(eval_dir)]  # fmt: skip
    run_logged(rtdetr_command(*eval_args), run_dir / "eval.log", thread_env())
    ann_file, _, _ = dataset_split(data, "val")
    metrics = coco_metrics(ann_file, json.loads((eval_dir / "predictions.json").read_text()))
    reported = json.loads((eval_dir / "metrics.json").read_text())
    if abs(reported["AP"] - metrics["AP"]) > 1e-4:  # the same COCOeval on the same detections: must agree
        print(f"  WARNING: rtdetr eval reported AP {reported['AP']:.4f}, the shared scorer {metrics['AP']:.4f}")
    last = read_last_checkpoint(train_dir)
    return {"budget_mode": mode, "train_wall_minutes": wall / 60, "batches": last["steps"],
            "epochs": last["steps"] / (dataset["train_images"] // last["batch_size"]),  # the loader drops the rest
            "loop_train_minutes": last["train_seconds"] / 60, **metrics}  # fmt: skip


# ---- YOLOv8n (the parent's side) -------------------------------------------------------------------------------


def yolo_env(config_dir: Path) -> dict[str, str]:
    """The worker's environment: THREADS threads, its settings and font under `config_dir`, no network use."""
    return thread_env(YOLO_CONFIG_DIR=str(config_dir), YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0")


def run_yolo(data: Path, dataset: dict[str, Any], yolo_yaml: Path, minutes: float, img_size: int, run_dir: Path,
             python: Path, config_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Train YOLOv8n in the venv for `minutes` (its time= mode), predict on val there, score here."""
    this_file, summary_file = str(Path(__file__).resolve()), run_dir / "train_summary.json"
    worker = [str(python), this_file, "--worker"]
    train = [*worker, "yolo-train", "--yolo-data", str(yolo_yaml), "--minutes", f"{minutes:g}", "--img-size",
             str(img_size), "--run-dir", str(run_dir), "--summary", str(summary_file)]  # fmt: skip
    print(f"  yolo time={minutes / 60:.4f} h imgsz={img_size} batch={YOLO_BATCH} (worker: {python})")
    wall = run_logged(train, run_dir / "train.log", yolo_env(config_dir))
    summary = json.loads(summary_file.read_text())
    ann_file, image_dir, _ = dataset_split(data, "val")
    results_file = run_dir / "predictions.json"
    predict = [*worker, "yolo-predict", "--weights", summary["best"], "--val-json", str(ann_file), "--images",
               str(image_dir), "--img-size", str(img_size), "--results", str(results_file)]  # fmt: skip
    run_logged(predict, run_dir / "predict.log", yolo_env(config_dir))
    metrics = coco_metrics(ann_file, json.loads(results_file.read_text()))
    return {"budget_mode": f"time={minutes / 60:.4f} h", "train_wall_minutes": wall / 60,
            "batches": summary["batches"], "epochs": summary["epochs"], "loop_train_minutes": None,
            "threads": summary["torch_threads"], "versions": summary["versions"], **metrics}  # fmt: skip


# ---- reports ---------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model (lscpu "Model name"), cores, Python and torch versions of this (the rtdetr) environment."""
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor() or "unknown")  # fmt: skip
    return {"cpu": model, "cores": os.cpu_count(), "threads_per_detector": THREADS,
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def dataset_table(name: str, dataset: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """The markdown table of one dataset's runs, the AP50 ratio on the rtdetr rows."""
    lines = [f"## {name}", "",
             f"`{dataset['path']}`: {dataset['train_images']} train / {dataset['val_images']} val images, "
             f"{dataset['val_boxes']} val boxes, {dataset['classes']} classes.", "",
             "| budget (min) | detector | budget set by | train wall (min) | batches of 16 / epochs | AP | AP50 "
             "| AP50 ours/YOLO |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        yolo = [r for r in runs if r["detector"] == "yolov8n" and r["minutes"] == run["minutes"]]
        ratio = "—"
        if run["detector"] == "rtdetr" and yolo:
            ratio = f"{run['AP50'] / yolo[0]['AP50']:.2f}" if yolo[0]["AP50"] > 0 else "n/a (YOLO 0)"
        lines.append(f"| {run['minutes']:g} | {run['detector']} | {run['budget_mode']} | "
                     f"{run['train_wall_minutes']:.1f} | {run['batches']} / {run['epochs']:.1f} | {run['AP']:.3f} | "
                     f"{run['AP50']:.3f} | {ratio} |")  # fmt: skip
    return lines + [""]


def write_reports(output: Path, machine: dict[str, Any], datasets: dict[str, dict], runs: list[dict]) -> str:
    """results.json and results.md under `output`; returns the markdown."""
    lines = [f"# Same wall-clock budget: rtdetr ({PRESET}, default recipe) vs Ultralytics YOLOv8n, from scratch", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores; {THREADS} threads per detector, runs one after "
             "the other. Scored by pycocotools COCOeval (bbox) on every val image; train wall = the whole "
             "training command.", ""]  # fmt: skip
    if any("FALLBACK" in r["budget_mode"] for r in runs):
        lines += ["**rtdetr had no `--time` flag: its runs trained a number of epochs estimated from a probed "
                  "step time (see 'budget set by').**", ""]  # fmt: skip
    for name, dataset in datasets.items():
        lines += dataset_table(name, dataset, [r for r in runs if r["dataset"] == name])
    report = "\n".join(lines)
    (output / "results.md").write_text(report)
    (output / "results.json").write_text(json.dumps({"machine": machine, "datasets": datasets, "runs": runs}, indent=1))
    return report


# ---- the benchmark ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="COCO-format dataset folder(s)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20], help="budgets (default: 5 10 20)")
    parser.add_argument("--img-size", type=int, default=320, help="training and evaluation size (default: 320)")
    parser.add_argument("--output", type=Path, default=Path("runs/budget"), help="default: %(default)s")
    parser.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS))
    parser.add_argument("--yolo-python", type=Path, default=DEFAULT_YOLO_PYTHON,
                        help="the Ultralytics venv's interpreter (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    if "yolov8n" in args.detectors and not args.yolo_python.exists():
        parser.error(f"no Ultralytics interpreter at {args.yolo_python}; create the venv: {VENV_HELP}")
    names = [d.resolve().name for d in args.data]
    if len(set(names)) != len(names):
        parser.error(f"datasets need distinct folder names (their results go to <output>/<name>): {names}")
    return args


def benchmark(args: argparse.Namespace) -> str:
    """Every dataset x budget x detector, one after the other; the reports rewritten after each run."""
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    machine, runs = machine_info(), []
    datasets = {d.resolve().name: describe_dataset(d.resolve()) for d in args.data}
    for name, dataset in datasets.items():
        data, root = Path(dataset["path"]), output / name
        yolo_yaml = None
        if "yolov8n" in args.detectors:
            yolo_yaml = write_yolo_dataset(data, fresh_dir(root / "yolo_data"))
        for minutes in args.minutes:
            for detector in args.detectors:
                load = os.getloadavg()[0]  # the machine is shared: a busy one slows every run
                print(f"[{name}] {minutes:g} min, {detector} (load average {load:.2f})")
                run_dir = fresh_dir(root / f"{minutes:g}min" / detector)
                if detector == "rtdetr":
                    record = run_rtdetr(data, dataset, minutes, args.img_size, run_dir)
                else:
                    record = run_yolo(data, dataset, yolo_yaml, minutes, args.img_size, run_dir, args.yolo_python,
                                      output / "ultralytics_config")  # fmt: skip
                runs.append({"dataset": name, "minutes": minutes, "detector": detector,
                             "load_average_before": load, **record})  # fmt: skip
                print(f"  -> {record['train_wall_minutes']:.2f} min wall, {record['batches']} batches "
                      f"({record['epochs']:.2f} epochs), AP {record['AP']:.3f}, AP50 {record['AP50']:.3f}")  # fmt: skip
                write_reports(output, machine, datasets, runs)
    return write_reports(output, machine, datasets, runs)


# ---- the Ultralytics worker (runs in the venv: the only code that imports ultralytics) ----------------------


def configure_ultralytics() -> None:
    """Offline and 2-thread set-up, before any training or prediction: the font its dataset check would
    download, settings without sync or logger integrations, THREADS torch threads (it would set cpu_count - 1)."""
    import matplotlib
    import torch

    font = Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics import settings

    settings.update({"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False})  # fmt: skip
    torch_utils.NUM_THREADS = THREADS
    torch.set_num_threads(THREADS)


class BatchCounter:
    """An Ultralytics `on_train_batch_start` callback: training batches seen, and batches per epoch."""

    def __init__(self) -> None:
        self.batches, self.per_epoch = 0, 0

    def __call__(self, trainer: Any) -> None:
        self.batches += 1
        self.per_epoch = len(trainer.train_loader)


def worker_train(args: argparse.Namespace) -> None:
    """YOLOv8n from its yaml, trained for `args.minutes`; writes a summary JSON (batches, epochs, best.pt)."""
    configure_ultralytics()
    import torch
    import ultralytics
    from ultralytics import YOLO

    model, counter = YOLO("yolov8n.yaml"), BatchCounter()
    model.add_callback("on_train_batch_start", counter)
    model.train(data=args.yolo_data, time=args.minutes / 60, imgsz=args.img_size, batch=YOLO_BATCH,
                device="cpu", pretrained=False, plots=False, amp=False, project=args.run_dir, name="train",
                exist_ok=True)  # fmt: skip
    summary = {"batches": counter.batches, "epochs": counter.batches / max(counter.per_epoch, 1),
               "best": str(model.trainer.best), "torch_threads": torch.get_num_threads(),
               "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__}}  # fmt: skip
    Path(args.summary).write_text(json.dumps(summary, indent=1))


def worker_predict(args: argparse.Namespace) -> None:
    """Detections of `args.weights` on every image of the val JSON (conf 0.001, max_det 100), in COCO results
    format with the JSON's image and category ids, to `args.results`."""
    configure_ultralytics()
    from ultralytics import YOLO

    coco = json.loads(Path(args.val_json).read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    model = YOLO(args.weights)
    if list(model.names.values()) != [c["name"] for c in categories]:
        raise ValueError(f"{args.weights} classes {model.names} are not {args.val_json}'s (sorted by id)")
    results = []
    for image in coco["images"]:
        prediction = model.predict(str(Path(args.images) / image["file_name"]), imgsz=args.img_size, conf=0.001,
                                   max_det=100, device="cpu", verbose=False)[0]  # fmt: skip
        boxes = prediction.boxes
        for (x0, y0, x1, y1), score, label in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
            box = [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)]
            results.append({"image_id": image["id"], "category_id": categories[int(label)]["id"], "bbox": box,
                            "score": round(score, 5)})  # fmt: skip
    Path(args.results).write_text(json.dumps(results))


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_budget.py --worker", description="Ultralytics side (in its venv)")
    parser.add_argument("mode", choices=("yolo-train", "yolo-predict"))
    for flag in ("--yolo-data", "--run-dir", "--summary", "--weights", "--val-json", "--images", "--results"):
        parser.add_argument(flag)
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--img-size", type=int)
    args = parser.parse_args(argv)
    (worker_train if args.mode == "yolo-train" else worker_predict)(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    print(benchmark(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
