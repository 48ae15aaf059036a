"""A reference model's summed log-probs of every preference pair, computed in one pass before
training (dpo.precompute_reference) and stored beside the rows as two more columns, so the
loss reads them instead of running the reference each step.

The values are kept in RUN_DIR/reference_logps.npz with a digest of the rows they belong to:
a resumed run reuses them (the reference is not loaded again); changed data is recomputed."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import sharding
from jaxllm.data.global_batch import to_global
from jaxllm.data.posttrain import ROW_KEYS
from jaxllm.tasks.sequences import pair_rows, sequence_logps

KEYS = ("chosen_ref_logps", "rejected_ref_logps")
FILE = "reference_logps.npz"


def attach(exp, data, reference_fn, mesh, run_dir, resuming: bool) -> None:
    """Add KEYS to each of data's row sets (train sources, eval): when resuming, from the file
    if it matches the rows; else computed with reference_fn() (the reference params) and saved
    (a fresh run never trusts a file an earlier run left, whose reference may differ)."""
    splits = {f"train{i}": rows for i, rows in enumerate(data.train_rows)}
    if data.eval_rows is not None:
        splits["eval"] = data.eval_rows
    digests = {name: _digest(rows) for name, rows in splits.items()}
    path = Path(run_dir) / FILE
    stored = _load(path, digests) if resuming else None
    # Every process must take the same branch (the computation is collective).
    if not all(multihost_utils.process_allgather(np.int32(stored is not None))):
        ref, stored = reference_fn(), {}
        fn = jax.jit(lambda p, b: sequence_logps(p, exp.model, pair_rows(b))[0])
        for name, rows in splits.items():
            stored[name] = _compute(fn, ref, rows, exp, mesh)
        if jax.process_index() == 0:
            _save(path, stored, digests)
    for name, rows in splits.items():
        rows[KEYS[0]], rows[KEYS[1]] = stored[name]


def _compute(fn, params, rows, exp, mesh):
    """(chosen, rejected) log-probs of all rows, in global batches of train.batch_size (each
    process feeds its share; the results are gathered on every process)."""
    glob, procs, me = exp.train.batch_size, jax.process_count(), jax.process_index()
    local = glob // procs
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    n = len(rows["chosen_tokens"])
    chosen, rejected = [], []
    for start in range(0, n, glob):
        idx = np.minimum(np.arange(start + me * local, start + (me + 1) * local), n - 1)
        batch = {f"{side}_{k}": rows[f"{side}_{k}"][idx]
                 for side in ("chosen", "rejected") for k in ROW_KEYS}
        both = fn(params, to_global(batch, bsh))  # [chosen of the global batch; rejected]
        both = np.asarray(multihost_utils.process_allgather(both, tiled=True))
        chosen.append(both[:glob])
        rejected.append(both[glob:])
    return np.concatenate(chosen)[:n], np.concatenate(rejected)[:n]


def _digest(rows) -> str:
    h = hashlib.sha256()
    for side in ("chosen", "rejected"):
        for k in ("tokens", "loss_mask"):
            h.update(np.ascontiguousarray(rows[f"{side}_{k}"]).tobytes())
    return h.hexdigest()


def _load(path: Path, digests: dict):
    """The stored values when the file exists, reads and matches the rows, else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if any(f"{name}/digest" not in f or str(f[f"{name}/digest"]) != d
                   for name, d in digests.items()):
                return None
            return {name: (f[f"{name}/chosen"], f[f"{name}/rejected"]) for name in digests}
    except (OSError, ValueError, zipfile.BadZipFile):  # missing or damaged: recompute
        return None


def _save(path: Path, stored: dict, digests: dict) -> None:
    arrays = {}
    for name, (c, r) in stored.items():
        arrays |= {f"{name}/chosen": c, f"{name}/rejected": r,
                   f"{name}/digest": np.array(digests[name])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # never a half-written file under the real name
