"""Host-local numpy batches -> global jax.Arrays on the mesh, and the vocab check before it."""
from __future__ import annotations

import jax
import numpy as np

from jaxllm.data.sources import DataError


def check_vocab(batch, vocab_size: int, where: str) -> None:
    """Refuse token ids outside [0, vocab_size) before they reach an embedding lookup (which
    would silently clamp them). `batch` is an id array, or a batch dict (tokens and targets
    are checked)."""
    if isinstance(batch, dict):
        for key in ("tokens", "targets"):
            if key in batch:
                check_vocab(batch[key], vocab_size, f"{where}, {key}")
        return
    ids = np.asarray(batch)
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside the model vocab [0, {vocab_size}) "
                        f"(model.vocab_size smaller than the tokenizer's?)")


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict:
    """This process's rows of a batch -> global jax.Arrays laid out by `sharding`.

    Each process passes its own rows, which land on the shards of its own devices; the global
    batch dimension is process_count times the local one, split over the batch mesh axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
