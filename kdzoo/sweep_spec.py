"""The spec of ``kdzoo sweep`` and the cells it expands to (docs/sweeps.md is the reference).

A spec names base recipes, a grid of dotted config keys and the values each takes, optional explicit cells
(each crossed with the grid) and overrides for all. Every cell's recipe is merged and validated exactly as
``kdzoo train`` would load it, before anything is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdzoo.config.loader import config_from_dict, deep_merge, read_recipe, read_yaml_mapping
from kdzoo.errors import UserInputError
from kdzoo.validation import merge_into_schema

EXECUTORS = ("local", "slurm")
CLUSTERS = ("slurm", "local", "debug")  # submitit's: a SLURM cluster, processes on this machine, in-process
MAX_CELL_NAME = 80


@dataclass
class ExecutorSpec:
    name: str = "local"  # local | slurm
    # local: cells at a time. 1 = one after another in this process; N > 1 = N `kdzoo train` subprocesses
    # sharing the CPU cores (runtime.threads = cores // N unless the recipe sets it).
    concurrent: int = 1
    # slurm (submitit's SlurmExecutor; its parameter names in docs/sweeps.md):
    cluster: str = "slurm"  # slurm | local | debug: submitit's executor (local/debug test the path on one machine)
    partition: str | None = None
    time_min: int = 60  # the job's time limit; USR1 comes signal_delay_s before it
    gpus_per_task: int = 1
    cpus_per_task: int | None = None  # also the cells' runtime.threads unless the recipe sets it
    mem_gb: float | None = None
    array_parallelism: int = 256  # job-array tasks running at once (submitit's default)
    signal_delay_s: int = 120
    max_num_timeout: int = 3  # requeues after reaching the time limit before the cell counts as failed
    setup: list[str] = field(default_factory=list)  # shell lines before each job, e.g. "module load cuda"
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # other sbatch options: {account: X}


@dataclass
class SweepSpec:
    name: str = ""
    output_dir: str = "sweeps"  # the sweep directory is <output_dir>/<name>
    base: list[str] = field(default_factory=list)  # recipes merged in order (paths relative to the spec file)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> values; the cells are the product
    cells: list[dict[str, Any]] = field(default_factory=list)  # explicit override sets, each crossed with the grid
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every cell
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)


@dataclass
class Cell:
    name: str
    overrides: dict[str, Any]  # the cell's own dotted overrides (its explicit cell + its grid point)
    recipe: dict[str, Any]  # bases + sweep overrides + cell overrides + its run directory
    run_dir: Path


def load_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"sweep spec {path} does not exist")
    data = read_yaml_mapping(path, "sweep spec")
    if isinstance(data.get("base"), str):
        data["base"] = [data["base"]]
    try:
        spec = merge_into_schema(SweepSpec, data)
    except UserInputError as exc:
        raise UserInputError(f"sweep spec {path}: {exc}") from None
    _check_spec(spec, path)
    return spec


def _check_spec(spec: SweepSpec, path: Path) -> None:
    ex = spec.executor
    checks = [
        (bool(spec.name) and re.fullmatch(r"[A-Za-z0-9._+-]+", spec.name) is not None,
         f"name must be a directory name (letters, digits, . _ + -), got {spec.name!r}"),
        (bool(spec.base) or any("base" in c for c in spec.cells) or "base" in spec.grid,
         "base must name at least one recipe (base: configs/...yaml)"),
        (ex.name in EXECUTORS, f"executor.name must be local or slurm, got {ex.name!r}"),
        (ex.cluster in CLUSTERS, f"executor.cluster must be one of {', '.join(CLUSTERS)}, got {ex.cluster!r}"),
        (ex.concurrent >= 1, "executor.concurrent must be >= 1"),
        (ex.time_min > 0, "executor.time_min must be positive"),
        (ex.array_parallelism >= 1, "executor.array_parallelism must be >= 1"),
        (0 <= ex.signal_delay_s < ex.time_min * 60, "executor.signal_delay_s must be >= 0 and below the time limit"),
        (ex.max_num_timeout >= 0, "executor.max_num_timeout must be >= 0"),
    ]
    for key, values in spec.grid.items():
        checks.append((len(values) > 0, f"grid.{key} needs at least one value"))
    for ok, message in checks:
        if not ok:
            raise UserInputError(f"sweep spec {path}: {message}")
    overridden = [*spec.grid, *_flatten(spec.overrides), *(k for c in spec.cells for k in _flatten(c))]
    fixed = sorted({k for k in overridden if k in ("experiment.name", "experiment.output_dir")})
    if fixed:
        raise UserInputError(f"sweep spec {path}: {fixed[0]} is set by the sweep for every cell (<output_dir>/<name>/"
                             "<cell>); set the spec's output_dir and name instead")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}`` (an empty mapping stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "base":
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _safe(text: str) -> str:
    """Letters, digits and ``. + -`` only: ``_`` separates a name's parts."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _name_part(key: str, value: Any) -> str:
    if key == "base":  # configs/cifar100/kd/resnet32x4_resnet8x4.yaml -> kd-resnet32x4-resnet8x4
        paths = value if isinstance(value, list) else [value]
        return "+".join(_safe(f"{Path(p).parent.name}-{Path(p).stem}") for p in paths)
    parts = key.split(".")
    label = parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return f"{label}-{_safe(text)}"


def cell_names(override_sets: list[dict[str, Any]]) -> list[str]:
    """Readable and deterministic: ``method-kd_seed-1``; a short hash of the overrides is added where names
    would collide or run long."""
    readable = ["_".join(_name_part(k, v) for k, v in o.items()) or "default" for o in override_sets]
    digests = [hashlib.sha1(json.dumps(o, sort_keys=True, default=str).encode()).hexdigest()[:8]
               for o in override_sets]
    names = []
    for text, digest in zip(readable, digests, strict=True):
        clash = readable.count(text) > 1
        names.append(f"{text[:MAX_CELL_NAME - 9]}-{digest}" if clash or len(text) > MAX_CELL_NAME else text)
    return names


def build_cells(spec: SweepSpec, spec_dir: Path) -> list[Cell]:
    """Every cell's recipe, validated: a bad cell raises UserInputError naming it, before anything is written."""
    keys = list(spec.grid)
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(spec.grid[k] for k in keys))]
    override_sets = []
    for index, explicit in enumerate(spec.cells or [{}]):
        explicit = _flatten(explicit)
        both = sorted(set(explicit) & set(keys))
        if both:
            raise UserInputError(f"cells[{index}] and grid both set {both[0]}: give it in one place")
        override_sets += [{**explicit, **point} for point in points]
    names = cell_names(override_sets)
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:
            raise UserInputError(f"cells {seen[name]} and {index} have the same overrides {override_sets[index]}: "
                                 "each cell must be a different experiment")
        seen[name] = index
    sweep_dir = Path(spec.output_dir) / spec.name
    cells = []
    for name, overrides in zip(names, override_sets, strict=True):
        try:
            recipe = _cell_recipe(spec, spec_dir, overrides, sweep_dir, name)
            config_from_dict(recipe)
        except UserInputError as exc:
            raise UserInputError(f"sweep cell {name}: {exc}") from None
        cells.append(Cell(name, overrides, recipe, sweep_dir / name))
    return cells


def _cell_recipe(spec: SweepSpec, spec_dir: Path, overrides: dict[str, Any], sweep_dir: Path,
                 name: str) -> dict[str, Any]:
    bases = overrides.get("base", spec.base)
    recipe: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        path = spec_dir / base
        if not path.is_file():
            raise UserInputError(f"base recipe {base} not found (relative paths are read from the spec's folder, "
                                 f"{spec_dir})")
        recipe = deep_merge(recipe, read_recipe(path))
    dotted = {**_flatten(spec.overrides), **{k: v for k, v in overrides.items() if k != "base"}}
    if "method.name" in dotted and dotted["method.name"] != (recipe.get("method") or {}).get("name"):
        # The base's method hyper-parameters and published result belong to the base's method, not this one.
        recipe["method"] = {}
        recipe.pop("published", None)
    recipe = deep_merge(recipe, _nest(dotted))
    return deep_merge(recipe, {"experiment": {"output_dir": str(sweep_dir), "name": name}})
