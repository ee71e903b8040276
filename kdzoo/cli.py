"""Command line: ``kdzoo train | eval | demo | bench | cache | export | plot | teachers | sweep | report | list``.
Bad input exits with code 2 and one paragraph."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdzoo.bench import BENCH_SETTINGS, format_table, run_bench, time_epoch
from kdzoo.config.loader import config_from_dict, deep_merge, load_config, parse_overrides
from kdzoo.data.crop_cache import CropCache, CropCacheKey, bytes_per_sample
from kdzoo.data.datasets import build_data
from kdzoo.demo import run_demo, run_detection_demo, run_segmentation_demo
from kdzoo.engine.crop_cache_build import build_crop_cache, parse_epochs, verify_crop_cache
from kdzoo.engine.metrics import EVALUATORS, PRIMARY_METRIC, EvalContext
from kdzoo.engine.run import run_training
from kdzoo.engine.runtime import resolve_device
from kdzoo.engine.setup import (
    build_model,
    cache_key_for,
    load_model_for_eval,
    load_weights,
    recorded_model_name,
    run_epochs,
    task_spec,
)
from kdzoo.engine.stop import TrainingStopped
from kdzoo.engine.teacher_cache import TeacherCache, build_cache, verify_cache
from kdzoo.errors import UserInputError
from kdzoo.export import FORMATS, export_student
from kdzoo.methods.registry import list_methods
from kdzoo.models.registry import count_parameters, create_model, list_models
from kdzoo.plot import plot_runs, read_metrics
from kdzoo.report import REPORT_FORMATS, collect, render
from kdzoo.report_figure import plot_report
from kdzoo.sweep import run_sweep
from kdzoo.teachers import PREFIX as TEACHERS_PREFIX
from kdzoo.teachers import eval_hint, fetch, format_listing, resolve_checkpoint, teacher_entry
from kdzoo.types import CLASSIFICATION, DETECTION, SEGMENTATION, TASKS

EXIT_USER_ERROR = 2
METRIC_NAMES = {"top1": "top-1", "top5": "top-5"}


def _configs_root() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    resume = args.resume
    # `resume=auto` may also be given as an override (torchrun restarts use the same arguments).
    for item in list(overrides):
        if item.startswith("resume="):
            resume = item.split("=", 1)[1]
            overrides.remove(item)
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    try:
        summary = run_training(cfg, resume=resume)
    except TrainingStopped as stopped:
        print(f"kdzoo: {stopped}", file=sys.stderr)
        return stopped.exit_code
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for the group
        return 0
    wall = time.perf_counter() - started
    scores = "no evaluated epoch"
    if summary["last"] is not None:
        last_epoch = read_metrics(summary["run_dir"])[-1]["epoch"]
        scores = (f"{summary['metric']} last {summary['last']:.2f} (epoch {last_epoch}), best {summary['best']:.2f} "
                  f"(epoch {summary['best_epoch']})")
    print(f"done in {wall:.1f} s: {scores}; run directory: {summary['run_dir']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # `teachers:NAME`: a published teacher, fetched and verified; its architecture and published top-1 are known.
    published = teacher_entry(args.checkpoint[len(TEACHERS_PREFIX):]) \
        if args.checkpoint.startswith(TEACHERS_PREFIX) else None
    checkpoint = resolve_checkpoint(args.checkpoint)
    architecture = args.model or (published.architecture if published else None)
    # The config only describes the data and the runtime here; its student is the evaluated architecture.
    name = architecture or recorded_model_name(checkpoint) or "resnet8"
    raw = deep_merge({"student": {"name": name}}, parse_overrides(args.overrides))
    cfg = config_from_dict(raw)
    device = resolve_device(cfg.runtime.device)
    data = build_data(cfg.data, seed=cfg.experiment.seed, device=device)
    model = load_model_for_eval(architecture, checkpoint, data.num_classes, data.input_shape)
    model.to(device)
    task = task_spec(cfg)
    metrics = EVALUATORS[task.name](model, data.test, EvalContext(task, data.num_classes))
    primary = PRIMARY_METRIC[task.name]
    shown = [primary, *(k for k in metrics if k != primary and "/" not in k)]
    print(f"{args.model or args.checkpoint} on {cfg.data.dataset} (evaluation split): "
          + "  ".join(f"{k} {metrics[k]:.4f}" if k == "loss" else f"{METRIC_NAMES.get(k, k)} {metrics[k]:.2f}"
                      for k in shown))
    if published is not None:
        source = published.top1_source
        print(f"published top-1 {published.top1:.2f} ({source}): this test set gives "
              f"{metrics[primary] - published.top1:+.2f}" if published.top1 is not None else
              f"no published top-1 for {published.name} ({source})")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "dataset": cfg.data.dataset,
                                               "metrics": metrics}, indent=1) + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        print(f"{'name':14s} {'tasks':29s} reference")
        for name, cls in list_methods().items():
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} {', '.join(cls.supported_tasks):29s} {doc}")
    elif args.what == "models":
        print(f"{'name':26s} {'family':12s} {'params (100 cls)':>16s}")
        for entry in list_models():
            with torch.device("meta"):
                params = count_parameters(create_model(entry.name, num_classes=100))
            print(f"{entry.name:26s} {entry.family:12s} {params:16,d}")
        print("plus any timm:<name> or torchvision:<name> model")
    else:
        root = _configs_root()
        for path in sorted(root.rglob("*.yaml")):
            if "_base_" not in path.parts:
                print(path.relative_to(root.parent))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.task == DETECTION:
        run_detection_demo(output_dir=args.output_dir, iterations=args.epochs, teacher_iterations=args.teacher_epochs,
                           data_root=args.data_root)
    elif args.task == SEGMENTATION:
        run_segmentation_demo(output_dir=args.output_dir, epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                              data_root=args.data_root)
    else:
        run_demo(output_dir=args.output_dir, epochs=args.epochs, teacher_epochs=args.teacher_epochs)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = BENCH_SETTINGS[args.task]
    teacher, student = args.teacher or setting.teacher, args.student or setting.student
    batch_size, image_size = args.batch_size or setting.batch_size, args.image_size or setting.image_size
    results = run_bench(teacher, student, batch_size, args.device,
                        args.methods.split(",") if args.methods else None, args.warmup, args.steps,
                        num_classes=setting.num_classes, with_cache=args.with_cache, channels_last=args.channels_last,
                        task=args.task, image_size=image_size, paired=args.paired)
    command = "kdzoo bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "kdzoo bench"
    layout = ", channels_last" if args.channels_last else ""
    header = (f"`{command}` — {args.task}, {teacher} -> {student}, batch {batch_size}, {image_size}x{image_size}, "
              f"{args.device}{layout}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}")
    if args.epoch_samples:
        results.append(time_epoch("kd", teacher, student, batch_size, args.device, args.data_root,
                                  args.epoch_samples, args.output_dir))
    print(format_table(results, header))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not cfg.teacher.cache:
        raise UserInputError("set teacher.cache=DIR: the directory the cache is written to / read from")
    device = resolve_device(cfg.runtime.device)
    data = build_data(cfg.data, seed=cfg.experiment.seed, device=device)
    teacher = build_model(str(cfg.teacher.name), data.num_classes, data.input_shape)
    load_weights(teacher, str(cfg.teacher.checkpoint), "teacher")
    teacher.to(device).eval()
    key = cache_key_for(cfg, data)
    if isinstance(key, CropCacheKey):
        return crop_cache_command(args, cfg, data, teacher, key)
    if args.action == "build":
        build_cache(teacher, data.train, key, Path(cfg.teacher.cache), progress=cfg.runtime.progress)
        print(f"teacher cache written to {cfg.teacher.cache}")
    cache = TeacherCache(cfg.teacher.cache, key, device)
    worst = verify_cache(cache, teacher, data.train, samples=args.samples)
    print(f"verified {args.samples} random views against the live teacher: largest difference {worst:.2f} "
          "fp16 rounding steps")
    if worst > 1.0:
        print("kdzoo: error: the cache disagrees with the live teacher beyond fp16 rounding", file=sys.stderr)
        return 1
    return 0


def crop_cache_command(args: argparse.Namespace, cfg: Any, data: Any, teacher: torch.nn.Module,
                       key: CropCacheKey) -> int:
    """``kdzoo cache build|verify`` for a class-folder dataset: per-epoch shards of crops and top-k logits."""
    directory = Path(cfg.teacher.cache)
    epochs = parse_epochs(args.epochs, run_epochs(cfg, data))
    if args.action == "build":
        shards = build_crop_cache(teacher, data.train, key, directory, epochs, build_seed=cfg.experiment.seed,
                                  progress=cfg.runtime.progress)
        per_epoch = bytes_per_sample(key.topk, key.num_classes) * key.num_samples
        print(f"crop cache: {len(shards)} epoch shard(s) written to {directory} "
              f"({per_epoch / 1e6:.2f} MB per epoch, {key.num_samples} images, top-{key.topk})")
    cache = CropCache(directory, key, epochs=max(epochs))
    check = verify_crop_cache(cache, teacher, data.train, epoch=epochs[0], samples=args.samples)
    print(f"verified {check.samples} replayed crops of epoch {epochs[0]} against the live teacher: top-{key.topk} "
          f"logits within {check.top_fp16_steps:.2f} fp16 steps, softmax L1 {check.prob_l1_max:.2e} "
          f"(bound: 2 x tail mass {check.tail_mass_max:.2e} + rounding)")
    if check.top_fp16_steps > 1.0 or check.prob_l1_max > 2 * check.tail_mass_max + 1e-2:
        print("kdzoo: error: the cache disagrees with the live teacher beyond its bound", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_student(args.source, args.format, args.output, image_size=args.image_size, opset=args.opset)
    shape = "x".join(str(d) for d in result.metadata["input"]["shape"])
    print(f"exported {result.checkpoint} to {result.path} ({args.format}, input {shape}); metadata in "
          f"{result.metadata_path}")
    print(f"checked against the PyTorch model: max |difference| {result.max_abs_diff:.3g}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    output = plot_runs(args.runs, args.output, labels)
    print(f"curves of {len(args.runs)} run(s) written to {output}")
    return 0


def cmd_teachers(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(format_listing(args.dir))
        return 0
    for teacher, path in fetch(args.names, args.dir):
        print(eval_hint(teacher, path))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    return run_sweep(args.spec, executor=args.executor, dry_run=args.dry_run)


def cmd_report(args: argparse.Namespace) -> int:
    collected = collect(args.paths)
    text = render(collected, args.format)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(f"{args.format} report of {len(collected.runs)} run(s) written to {args.output}")
    else:
        print(text, end="" if text.endswith("\n") else "\n")
    if args.plot:
        print(f"figure written to {plot_report(collected, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdzoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a teacher or distil a student from a YAML config")
    train.add_argument("config", help="YAML recipe, e.g. configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=../shared/data schedule.epochs=1")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue the run: newest valid checkpoint (default) or the given file")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint on the test split")
    ev.add_argument("--model", default=None, help="architecture (not needed for kdzoo exports that record it)")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--json", default=None, help="also write every metric, unrounded, to this JSON file")
    ev.add_argument("overrides", nargs="*", help="e.g. data.root=../shared/data data.dataset=cifar100")
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="a teacher, a plain student and distilled ones on data that installs with a "
                          "package (MNIST-5k digits, DSB-2018 nuclei, deepforest tree crowns)")
    demo.add_argument("--task", default=CLASSIFICATION, choices=TASKS)
    demo.add_argument("--data-root", default="data",
                      help="segmentation / detection: where the nuclei or trees VOC tree is written")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--epochs", type=int, default=None,
                      help="student budget: epochs (detection: iterations); default: the demo's")
    demo.add_argument("--teacher-epochs", type=int, default=None, help="teacher budget, in the same unit")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="s/step of every method vs the compute floor")
    bench.add_argument("--task", default=CLASSIFICATION, choices=TASKS)
    bench.add_argument("--teacher", default=None, help="default: resnet32x4 / deeplabv3plus_resnet101")
    bench.add_argument("--student", default=None, help="default: resnet8x4 / deeplabv3plus_resnet18")
    bench.add_argument("--batch-size", type=int, default=None, help="default: 64 / 2")
    bench.add_argument("--image-size", type=int, default=None, help="default: 32 / 129")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--methods", default=None, help="comma-separated subset (default: all registered)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--threads", type=int, default=None)
    bench.add_argument("--epoch-samples", type=int, default=0,
                       help="also time one KD epoch of the real trainer over the first N CIFAR-100 images")
    bench.add_argument("--data-root", default="../shared/data")
    bench.add_argument("--output-dir", default=".", help="where the epoch timing's temporary run goes")
    bench.add_argument("--channels-last", action="store_true",
                       help="networks, method modules and batch in channels_last (runtime.channels_last)")
    bench.add_argument("--with-cache", action="store_true",
                       help="also time logits-only methods with teacher logits from the cache")
    bench.add_argument("--paired", action="store_true",
                       help="alternate every method's steps with floor steps and add the ratio to those "
                            "(steadier on a shared machine; twice the timing)")
    bench.set_defaults(func=cmd_bench)

    cache = sub.add_parser("cache", help="build or verify the exact teacher-output cache of a config")
    cache.add_argument("action", choices=["build", "verify"])
    cache.add_argument("config")
    cache.add_argument("overrides", nargs="*", help="e.g. teacher.cache=caches/r32x4 data.root=../shared/data")
    cache.add_argument("--samples", type=int, default=256, help="random views recomputed by verify")
    cache.add_argument("--epochs", default=None,
                       help="class-folder datasets: the epochs to build, FIRST-LAST (default: 1 to the run's epochs); "
                            "disjoint ranges can be built on different machines into one directory")
    cache.set_defaults(func=cmd_cache)

    export = sub.add_parser("export", help="a trained student as ONNX, TorchScript or safetensors, checked "
                            "against PyTorch")
    export.add_argument("source", help="run directory (its student_best.pt, else student_last.pt) or a "
                        "student_*.pt file")
    export.add_argument("--format", required=True, help=" | ".join(FORMATS))
    export.add_argument("--output", default=None, help="default: next to the checkpoint, e.g. student_best.onnx")
    export.add_argument("--image-size", type=int, default=None,
                        help="input height = width (default: from the run's config.yaml)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.set_defaults(func=cmd_export)

    plot = sub.add_parser("plot", help="accuracy and loss curves of runs, side by side, to an image")
    plot.add_argument("runs", nargs="+", help="run directories (each holds a metrics.jsonl)")
    plot.add_argument("--output", default="curves.png", help="image file (.png, .pdf, .svg)")
    plot.add_argument("--labels", default=None, help="comma-separated legend labels (default: directory names)")
    plot.set_defaults(func=cmd_plot)

    teachers = sub.add_parser("teachers", help="the published CIFAR-100 teachers: list them, fetch them verified")
    teachers.add_argument("action", choices=["list", "fetch"])
    teachers.add_argument("names", nargs="*", help="fetch: teacher names from `kdzoo teachers list`, or all")
    teachers.add_argument("--dir", default=None, help="teachers directory (default: $KDZOO_TEACHERS or ./teachers)")
    teachers.set_defaults(func=cmd_teachers)

    sweep = sub.add_parser("sweep", help="a grid of runs (methods x seeds x ...) from a spec, locally or on SLURM; "
                           "re-running continues it")
    sweep.add_argument("spec", help="sweep spec YAML (docs/sweeps.md)")
    sweep.add_argument("--executor", choices=["local", "slurm"], default=None, help="default: the spec's executor.name")
    sweep.add_argument("--dry-run", action="store_true", help="validate every cell and list them; run nothing")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="tables of runs and sweeps: mean ± std over seeds, published, gain over "
                            "the cross-entropy student")
    report.add_argument("paths", nargs="+", help="sweep directories, run directories, or folders holding runs")
    report.add_argument("--format", default="markdown", choices=REPORT_FORMATS)
    report.add_argument("--output", default=None, help="write the table to this file (default: print it)")
    report.add_argument("--plot", default=None, help="also draw bars and curves to this image (.png, .pdf, .svg)")
    report.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="what exists")
    ls.add_argument("what", choices=["methods", "models", "configs"])
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as exc:
        # One paragraph: collapse whatever line breaks a wrapped library message carried.
        print("kdzoo: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
