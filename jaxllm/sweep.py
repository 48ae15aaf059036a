"""Hyperparameter sweeps: a base config, dotted keys with value lists (grid) or distributions
(random), one run directory per point, finished points skipped on re-launch, and a results
table (CSV + Markdown) with loss-curve and final-loss plots.

    base: ../quickstart.yaml          # relative to the sweep file
    out_dir: runs/sweeps/lr           # default: runs/sweeps/<sweep file stem>
    overrides: [train.steps=100]      # applied to every point
    method: grid                      # or random (with count and seed)
    parameters:
      optimizer.lr: [3.0e-4, 1.0e-3, 3.0e-3]
      optimizer.warmup_steps: {distribution: int_uniform, min: 10, max: 50}
      optimizer.weight_decay: {distribution: log_uniform, min: 0.001, max: 0.1}
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import random
import re
import traceback
from pathlib import Path

import yaml

from jaxllm import config as config_lib
from jaxllm.config import ConfigError

_DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "choice")
_SWEEP_KEYS = ("base", "out_dir", "overrides", "method", "count", "seed", "parameters")


def _sample(spec: dict, rng: random.Random, key: str, where: str):
    dist = spec.get("distribution")
    if dist not in _DISTRIBUTIONS:
        raise ConfigError(f"{where}: parameters.{key}: distribution must be one of "
                          f"{list(_DISTRIBUTIONS)}, got {dist!r}")
    if dist == "choice":
        return rng.choice(spec["values"])
    lo, hi = spec.get("min"), spec.get("max")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)) or lo > hi:
        raise ConfigError(f"{where}: parameters.{key}: needs numeric min <= max, got {lo!r}, {hi!r}")
    if dist == "uniform":
        return rng.uniform(lo, hi)
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def points(sweep: dict, where: str) -> list[dict]:
    """The list of {dotted key: value} points a sweep file describes."""
    params = sweep.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: parameters: a mapping of dotted keys to values is required")
    method = sweep.get("method", "grid")
    if method == "grid":
        for k, v in params.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{where}: parameters.{k}: grid sweeps need a non-empty list")
        keys = list(params)
        return [dict(zip(keys, combo)) for combo in itertools.product(*params.values())]
    if method == "random":
        count = sweep.get("count")
        if not isinstance(count, int) or count <= 0:
            raise ConfigError(f"{where}: count: random sweeps need a positive integer count")
        rng = random.Random(sweep.get("seed", 0))
        return [{k: (rng.choice(v) if isinstance(v, list) else _sample(v, rng, k, where))
                 for k, v in params.items()} for _ in range(count)]
    raise ConfigError(f"{where}: method: expected 'grid' or 'random', got {method!r}")


def point_name(point: dict) -> str:
    parts = []
    for k, v in point.items():
        short = k.split(".")[-1]
        val = f"{v:.4g}" if isinstance(v, float) else str(v)
        parts.append(f"{short}={val}")
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(parts))


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        sweep = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for k in sweep:
        if k not in _SWEEP_KEYS:
            import difflib
            near = difflib.get_close_matches(k, _SWEEP_KEYS, 1)
            raise ConfigError(f"{path}: {k}: unknown sweep key"
                              f"{f'; did you mean {near[0]!r}?' if near else ''}")
    if "base" not in sweep:
        raise ConfigError(f"{path}: base: the base experiment config is required")
    return sweep


def resolve_points(path: str | Path, extra_overrides=(), out_dir=None):
    """[(name, run_dir, point, Experiment)] for every point, all validated before any run."""
    path = Path(path)
    sweep = load_sweep(path)
    base = (path.parent / sweep["base"]).resolve()
    out = Path(out_dir or sweep.get("out_dir") or f"runs/sweeps/{path.stem}")
    common = [*sweep.get("overrides", []), *extra_overrides]
    resolved = []
    for point in points(sweep, str(path)):
        name = point_name(point)
        run_dir = out / name
        ov = [*common, *(f"{k}={json.dumps(v)}" for k, v in point.items()),
              f"run_dir={run_dir}", f"name={name}"]
        resolved.append((name, run_dir, point, config_lib.load(base, ov)))
    return out, resolved


def run_sweep(path: str | Path, extra_overrides=(), out_dir=None) -> Path:
    from jaxllm.train.loop import run
    out, resolved = resolve_points(path, extra_overrides, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, run_dir, point, exp) in enumerate(resolved):
        done_file = run_dir / "result.json"
        if done_file.is_file():
            print(f"[{i + 1}/{len(resolved)}] {name}: finished earlier, skipped")
            result = json.loads(done_file.read_text())
        else:
            print(f"[{i + 1}/{len(resolved)}] {name}")
            try:
                r = run(exp)
                result = {"status": "ok", **{k: r.get(k) for k in
                                             ("loss", "eval_loss", "tokens_per_sec", "mfu")}}
                done_file.write_text(json.dumps(result))
            except Exception as e:  # one failed point must not lose the others
                traceback.print_exc()
                result = {"status": f"failed: {type(e).__name__}: {e}".splitlines()[0]}
        rows.append({"run": name, **point, **result})
    write_results(out, rows, list(resolved[0][2]))
    _plot(out, [r[1] for r in resolved], rows, list(resolved[0][2]))
    print(f"results: {out / 'results.md'}")
    return out


def write_results(out: Path, rows: list[dict], keys: list[str]) -> None:
    cols = ["run", *keys, "loss", "eval_loss", "tokens_per_sec", "status"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(out: Path, run_dirs, rows, keys) -> None:
    from jaxllm.train.metrics import plot_runs
    plot_runs([d for d in run_dirs if (d / "metrics.jsonl").is_file()], out / "curves.png",
              keys=("loss",))
    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) for r in rows)]
    if len(numeric) != 1:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = numeric[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric in ("loss", "eval_loss"):
        pts = sorted((r[k], r[metric]) for r in rows if isinstance(r.get(metric), float))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"final {metric}")
    if k.endswith("lr") or "weight_decay" in k:
        ax.set_xscale("log")
    ax.set_xlabel(k)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "final_loss.png", dpi=110)
    plt.close(fig)
