"""AOT compile of the real train step for a TPU topology on this CPU host (needs libtpu)."""
import pytest

from jaxllm import cli, compile_plan, config

pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")

SMALL = ["model.preset=tiny", "model.num_layers=2", "data.seq_len=512", "train.batch_size=8",
         "model.compute_dtype=bfloat16"]


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_memory_plan_for_a_tpu_slice_and_remat_differences():
    exp = config.load(None, [*SMALL, "model.num_layers=4"])  # activations outweigh the head
    plans = {r: compile_plan.plan(compile_plan.with_remat(exp, r), "v5e:2x2")
             for r in ("none", "full")}
    none, full = plans["none"], plans["full"]
    assert none["chips"] == 4 and none["mesh"].startswith("data=1 x fsdp=4")
    assert none["arguments"] > 0 and none["flops_per_chip"] > 0 and none["fits"]
    assert full["temporaries"] < none["temporaries"]  # full remat really saves activations
    assert full["flops_per_chip"] > none["flops_per_chip"]  # ... by recomputing them
    # With a large vocabulary the logits dominate; forming them 8 blocks at a time cuts them.
    whole, blocks = (compile_plan.plan(compile_plan.with_remat(config.load(None, [
        *SMALL, "model.vocab_size=32768", "data.seq_len=2048", "model.max_seq_len=2048",
        f"model.loss_chunks={n}"]), "full"), "v5e:2x2")
        for n in (1, 8))
    assert blocks["temporaries"] < 0.5 * whole["temporaries"], (blocks, whole)
    assert blocks["model_flops_per_chip"] == whole["model_flops_per_chip"]


@pytest.mark.tpu_aot
def test_plans_for_tasks_with_frozen_models_and_pair_batches():
    """LoRA over an int8 base (adapters inside the layers: the kernels stay int8, sharded like
    the float ones) and full DPO (a frozen reference, preference-pair batches) compile; the
    LoRA step's inputs (int8 base, adapters and their moments) are a fraction of full
    training's (params and two fp32 moments)."""
    small = [*SMALL, "data.seq_len=256"]
    full = compile_plan.plan(config.load(None, [*small, "task=sft"]), "v5e:2x2")
    lora = compile_plan.plan(config.load(None, [*small, "task=sft", "lora.rank=8",
                                                "lora.base_dtype=int8"]), "v5e:2x2")
    dpo = compile_plan.plan(config.load(None, [*small, "task=dpo"]), "v5e:2x2")
    assert lora["fits"] and dpo["fits"] and full["fits"]
    assert lora["arguments"] < full["arguments"] / 4
    assert dpo["arguments"] > full["arguments"]  # the frozen reference is an argument


@pytest.mark.tpu_aot
def test_bad_topology_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["compile", str(tmp_path / "c.yaml"), *SMALL, "--topology", "v9z:1x1"])
    assert e.value.code == 2 and "v9z:1x1" in capsys.readouterr().err


@pytest.mark.tpu_aot
def test_tpu_mesh_presets_match_libtpu_topologies():
    """libtpu's own description of each preset's topology has the preset's device count, and
    the mesh puts dcn axes across slices (each slice holds whole fsdp groups)."""
    from jaxllm import sharding
    from jaxllm.mesh_presets import MESH_PRESETS
    for name, p in MESH_PRESETS.items():
        if p.get("topology"):
            slices = p.get("num_slices", 1)
            devices = compile_plan.topology_devices(p["topology"], slices)
            assert len(devices) == p["devices"], name
            assert len({getattr(d, "slice_index", 0) for d in devices}) == slices, name
            mesh = sharding.make_mesh(config.load(None, [f"mesh.preset={name}"]).mesh, devices)
            assert mesh.shape["data"] == slices and mesh.shape["fsdp"] == p["devices"] // slices
            for group in mesh.devices.reshape(slices, -1):  # data-major: one slice per row
                assert len({getattr(d, "slice_index", 0) for d in group}) == 1, name


def test_a_plan_that_does_not_fit_names_the_knobs_left():
    gib = 1024**3
    p = {"topology": "v5p:4x4x4", "num_slices": 1, "chips": 64, "mesh": "fsdp=64",
         "remat": "save_dots", "attention": "reference", "batch": (128, 8192), "hbm": 95 * gib,
         "arguments": gib, "outputs": gib, "aliased": gib, "temporaries": 124 * gib,
         "total": 125 * gib, "fits": False, "flops_per_chip": 1e14, "model_flops_per_chip": 2e15,
         "loss_chunks": 1}
    text = compile_plan.describe(p)
    assert "batch 128 x 8192 tokens, remat=save_dots, attention=reference" in text
    assert "DOES NOT FIT: try model.remat=full, model.attention_impl=flash" in text
    assert "model.loss_chunks=8 or more" in text and "model 2e+15" in text
    text = compile_plan.describe({**p, "remat": "full", "attention": "flash"})
    assert "remat=full," not in text.splitlines()[-1] and "attention_impl" not in text.splitlines()[-1]
    assert "mesh.ici.sequence" in text
