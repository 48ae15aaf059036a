"""Run metrics: progress bar, metrics.jsonl, TensorBoard, throughput and MFU, loss plots."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor figures), matched by substring of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "B200": 2250e12, "A100": 312e12,
    "L4": 121e12, "A10G": 70e12,
}

_CPU_PEAK: float | None = None


def measured_cpu_peak() -> float:
    """FLOP/s of a 1024^3 fp32 matmul on this host (best of a few runs), measured once."""
    global _CPU_PEAK
    if _CPU_PEAK is None:
        a = jax.device_put(np.random.default_rng(0).standard_normal((1024, 1024), np.float32),
                           jax.local_devices()[0])
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = min(best, time.perf_counter() - t)
        _CPU_PEAK = 2 * 1024**3 / best
    return _CPU_PEAK


def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return override
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # Host devices share the cores: split the measured host peak among them.
        return measured_cpu_peak() / jax.local_device_count()
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in dev.device_kind.lower():
            return flops
    return float("nan")


class MetricsLogger:
    """Writes metrics.jsonl and TensorBoard events (process 0 only) and drives a progress bar."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, *,
                 tensorboard: bool = True, progress_bar: bool = True):
        self.run_dir = Path(run_dir)
        self.main = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            desc="train", unit="step")

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix_str(_postfix(record), refresh=False)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def _postfix(r: dict) -> str:
    parts = [f"loss={r['loss']:.3f}"]
    if "tokens_per_sec" in r:
        parts.append(f"tok/s={r['tokens_per_sec']:,.0f}")
    if "mfu" in r and r["mfu"] == r["mfu"]:
        parts.append(f"mfu={100 * r['mfu']:.1f}%")
    if "eval_loss" in r:
        parts.append(f"eval={r['eval_loss']:.3f}")
    return " ".join(parts)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs, out: str | Path, keys=("loss", "eval_loss")) -> Path:
    """Loss curves of one or several runs in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in run_dirs:
        rows = read_metrics(run)
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, markersize=3,
                        label=f"{Path(run).name} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
