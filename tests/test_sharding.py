"""Sharded training equals single-device training (8 host CPU devices, fp32)."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxllm import config, models, sharding
from jaxllm.tasks import pretrain
from jaxllm.train import step as step_lib
from jaxllm.train.optimizer import make_optimizer, schedule

MESHES = {
    "single": None,
    "fsdp8": dict(fsdp=8),
    "data2-fsdp2-tensor2": dict(data=2, fsdp=2, tensor=2),
    "data4-tensor2": dict(data=4, tensor=2),
    "data2-sequence4": dict(data=2, sequence=4),
}


def tiny_experiment():
    return config.load(None, [
        "model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.batch_size=8", "optimizer.warmup_steps=2", "optimizer.lr=1e-2",
        "train.steps=5"])


def synthetic_batches(n, batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(1, vocab, (batch, seq + 1)).astype(np.int32)
        seg = np.where(np.arange(seq) < seq // 2 + 3, 1, 2)[None].repeat(batch, 0).astype(np.int32)
        pos = np.asarray(models.positions_from_segments(seg))
        mask = np.ones((batch, seq), np.float32)
        mask[:, seq // 2 + 2] = 0.0  # the last token of segment 1 has no target in its document
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": pos, "loss_mask": mask})
    return out


def train_losses(exp, mesh, batches):
    opt = make_optimizer(exp.optimizer, exp.train.steps)
    abstract = step_lib.abstract_state(exp, opt, mesh)
    state = step_lib.init_state(exp, opt, mesh)
    loss_fn = pretrain.PretrainTask().loss_fn(exp)
    train_step = step_lib.make_train_step(exp, loss_fn, opt, schedule(exp.optimizer, 5), mesh,
                                          abstract)
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    losses = []
    for b in batches:
        state, m = train_step(state, jax.device_put(b, bsh))
        losses.append(float(m["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def reference():
    exp = tiny_experiment()
    batches = synthetic_batches(1, 8, 32, 128) * 5  # one batch repeated: loss must fall
    losses, _ = train_losses(exp, sharding.single_device_mesh(), batches)
    return exp, batches, losses


@pytest.mark.parametrize("name", [m for m in MESHES if m != "single"])
def test_sharded_training_matches_single_device(reference, name):
    exp, batches, ref = reference
    assert jax.device_count() == 8
    exp = dataclasses.replace(exp, mesh=sharding.with_sizes(exp.mesh, **MESHES[name]))
    mesh = sharding.make_mesh(exp.mesh)
    losses, state = train_losses(exp, mesh, batches)
    np.testing.assert_allclose(losses, ref, rtol=2e-5)
    assert ref[-1] < ref[0]  # it really trained
    q = state["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    if name == "fsdp8":  # params and their Adam moments really are sharded, not replicated
        assert q.sharding.shard_shape(q.shape) != q.shape
        moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
                   if "q_proj" in jax.tree_util.keystr(path)]
        assert moments and all(m.sharding.is_equivalent_to(q.sharding, q.ndim) for m in moments)


def test_grad_accumulation_matches_one_big_batch(reference):
    exp, batches, ref = reference
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, grad_accum=2))
    losses, _ = train_losses(exp, sharding.single_device_mesh(), batches)
    np.testing.assert_allclose(losses, ref, rtol=2e-5)


def test_mesh_size_mismatch_is_a_clear_error():
    exp = config.load(None, ["mesh.ici.data=3", "mesh.ici.fsdp=1"])
    with pytest.raises(sharding.MeshError, match=r"mesh.ici: axis sizes .* multiply to 3, but there are 8"):
        sharding.make_mesh(exp.mesh)
    exp = config.load(None, ["mesh.ici.data=3", "mesh.ici.fsdp=-1"])
    with pytest.raises(sharding.MeshError, match="do not divide 8 devices"):
        sharding.make_mesh(exp.mesh)


def test_params_are_created_sharded():
    exp = dataclasses.replace(tiny_experiment(), mesh=sharding.with_sizes(config.MeshConfig(), fsdp=4, tensor=2))
    mesh = sharding.make_mesh(exp.mesh)
    params = models.init_sharded(exp.model, jax.random.key(0), mesh, exp.mesh.rules)
    emb = params["embed_tokens"]["embedding"]  # [vocab, embed] -> (tensor, fsdp)
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(
        models.init(exp.model, jax.random.key(0))["embed_tokens"]["embedding"]))
