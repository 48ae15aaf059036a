"""Configs: YAML + overrides, presets, errors naming file/line/key, every example parses."""
from pathlib import Path

import pytest
import yaml

from jaxllm import config
from jaxllm.config import ConfigError
from jaxllm.sweep import load_sweep, resolve_points

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").rglob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_experiment_config_parses(path):
    if "sweeps" in path.parts:
        out, pts = resolve_points(path)
        assert pts and all(isinstance(e, config.Experiment) for *_, e in pts)
    else:
        exp = config.load(path)
        assert exp.model.vocab_size > 0


def test_overrides_and_preset(tmp_path):
    p = write(tmp_path, "model:\n  preset: llama3-8b\n  num_layers: 2\ntrain:\n  steps: 7\n")
    exp = config.load(p, ["optimizer.lr=1e-3", "model.remat=full", "train.sample_prompts=[a, b]"])
    assert exp.model.hidden_size == 4096 and exp.model.num_layers == 2  # preset + field override
    assert exp.optimizer.lr == 1e-3 and isinstance(exp.optimizer.lr, float)
    assert exp.model.remat == "full" and exp.train.steps == 7
    assert exp.train.sample_prompts == ("a", "b")
    exp2 = config.load(p, ["model.preset=qwen2.5-0.5b"])  # the preset itself from the CLI
    assert exp2.model.qkv_bias and exp2.model.tie_embeddings and exp2.model.num_layers == 2


def test_resolved_yaml_round_trips(tmp_path):
    exp = config.load(ROOT / "experiments/quickstart.yaml", ["train.steps=3"])
    path = config.save_resolved(exp, tmp_path)
    assert config.load(path) == exp
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 3


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "train:\n  steps: 3\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:3: train.batch_sise: unknown key; did you mean 'train.batch_size'"):
        config.load(p)
    with pytest.raises(ConfigError, match=r"command-line override: optimizer.lrr: unknown key; did you mean 'optimizer.lr'"):
        config.load(None, ["optimizer.lrr=1"])


def test_wrong_type_names_key_type_and_value(tmp_path):
    p = write(tmp_path, "model:\n  num_layers: four\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:2: model.num_layers: expected int, got str 'four'"):
        config.load(p)


@pytest.mark.parametrize("overrides, message", [
    (["model.attention_impl=flsh"], r"model.attention_impl: 'flsh' is not one of .*did you mean 'flash'"),
    (["model.preset=llama3-9b"], r"model.preset: unknown preset 'llama3-9b'; did you mean 'llama3-8b'"),
    (["model.num_kv_heads=3"], r"model.num_kv_heads: 3 does not divide num_heads=8"),
    (["model.loss_chunks=3", "data.seq_len=512"], r"model.loss_chunks: 3 does not divide data.seq_len=512"),
    (["model.loss_chunks=0"], r"model.loss_chunks: must be positive, got 0"),
    (["lora.dropout=1.0"], r"lora.dropout: 1.0 is not in \[0, 1\)"),
    (["dpo.precompute_reference=true", "dpo.reference_free=true"],
     r"dpo.precompute_reference: nothing to precompute"),
])
def test_bad_values_name_their_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_missing_file_and_bad_sweep(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    s = tmp_path / "s.yaml"
    s.write_text("base: exp.yaml\nparameters:\n  optimizer.lr: {distribution: gaussian}\nmethod: random\ncount: 2\n")
    write(tmp_path, "train: {steps: 2}\n")
    with pytest.raises(ConfigError, match="distribution must be one of"):
        resolve_points(s)
    s.write_text("base: exp.yaml\nparamters: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'parameters'"):
        load_sweep(s)


def _hardware_devices(name: str, p: dict) -> int:
    """Devices from the hardware's own name/topology, not the preset's count: TPU topologies
    count chips (one jax device each), v5p names count TensorCores (2 per chip), v5e/v6e names
    count chips; GPU names count GPUs per node and nodes."""
    import math
    import re
    if p.get("topology"):
        gen, dims = p["topology"].split(":")
        chips = math.prod(int(d) for d in dims.split("x")) * p.get("num_slices", 1)
        named = re.fullmatch(r"(v\d+[a-z]*)-(\d+)(?:x(\d+))?", name)
        assert named and named[1] == gen, name
        per_chip = 2 if gen == "v5p" else 1
        assert chips == int(named[2]) // per_chip * int(named[3] or 1), name
        return chips
    m = re.fullmatch(r"(?:h100|cpu)-(\d+)(?:x(\d+))?", name)
    assert m, name
    return int(m[1]) * int(m[2] or 1)


def test_mesh_presets_resolve_and_match_their_hardware():
    import math

    from jaxllm.mesh_presets import MESH_PRESETS
    from jaxllm.sharding import resolve_axis_sizes
    for name, p in MESH_PRESETS.items():
        exp = config.load(None, [f"mesh.preset={name}"])
        assert exp.mesh.devices == p["devices"] == _hardware_devices(name, p), name
        slices = math.prod(p.get("dcn", {}).values())  # TPU slices or GPU nodes
        assert slices == p.get("num_slices", slices)
        ici, dcn = resolve_axis_sizes(exp.mesh, p["devices"], slices)
        assert math.prod(ici) * math.prod(dcn) == p["devices"], name
    exp = config.load(None, ["mesh.preset=v5e-256", "mesh.ici.tensor=4"])
    assert (exp.mesh.ici.fsdp, exp.mesh.ici.tensor, exp.mesh.topology) == (-1, 4, "v5e:16x16")
    exp = config.load(None, ["mesh.preset=h100-4x8", "mesh.dcn.data=2", "mesh.dcn.fsdp=2"])
    assert (exp.mesh.ici.fsdp, exp.mesh.dcn.data, exp.mesh.dcn.fsdp) == (8, 2, 2)


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.parent.name in ("tpu", "gpu")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_hardware_configs_lay_out_on_their_hardware(path):
    """Each TPU/GPU experiment's mesh fills its preset's devices, and its batch and sequence
    split evenly over the mesh (so a launch cannot fail on shapes)."""
    import math

    from jaxllm.sharding import AXES, resolve_axis_sizes
    exp = config.load(path)
    assert exp.mesh.preset and exp.mesh.devices, "hardware configs name a mesh preset"
    slices = math.prod(getattr(exp.mesh.dcn, a) for a in AXES)
    ici, dcn = resolve_axis_sizes(exp.mesh, exp.mesh.devices, slices)
    size = {a: i * d for a, i, d in zip(AXES, ici, dcn)}
    shards = size["data"] * size["fsdp"]
    assert exp.train.batch_size % exp.train.grad_accum == 0
    assert (exp.train.batch_size // exp.train.grad_accum) % shards == 0
    assert exp.data.seq_len % size["sequence"] == 0 and exp.data.seq_len <= exp.model.max_seq_len


def test_unknown_mesh_preset_and_wrong_hardware_are_clear_errors():
    from jaxllm import sharding
    with pytest.raises(ConfigError, match="unknown mesh preset 'v5p-12'; did you mean 'v5p-128'"):
        config.load(None, ["mesh.preset=v5p-12"])
    exp = config.load(None, ["mesh.preset=h100-1"])
    with pytest.raises(sharding.MeshError, match="mesh.preset=h100-1 is for 1 devices, but this run has 8"):
        sharding.make_mesh(exp.mesh)
    assert sharding.make_mesh(config.load(None, ["mesh.preset=cpu-8"]).mesh).shape["fsdp"] == 4
