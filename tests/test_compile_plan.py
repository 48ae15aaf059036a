"""AOT compile of the real train step for a TPU topology on this CPU host (needs libtpu)."""
import pytest

from jaxllm import cli, compile_plan, config

pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")

SMALL = ["model.preset=tiny", "model.num_layers=2", "data.seq_len=512", "train.batch_size=8",
         "model.compute_dtype=bfloat16"]


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_memory_plan_for_a_tpu_slice_and_remat_differences():
    exp = config.load(None, SMALL)
    plans = {r: compile_plan.plan(compile_plan.with_remat(exp, r), "v5e:2x2")
             for r in ("none", "full")}
    none, full = plans["none"], plans["full"]
    assert none["chips"] == 4 and none["mesh"].startswith("data=1 x fsdp=4")
    assert none["arguments"] > 0 and none["flops_per_chip"] > 0 and none["fits"]
    assert full["temporaries"] < none["temporaries"]  # full remat really saves activations
    assert full["flops_per_chip"] > none["flops_per_chip"]  # ... by recomputing them


@pytest.mark.tpu_aot
def test_bad_topology_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["compile", str(tmp_path / "c.yaml"), *SMALL, "--topology", "v9z:1x1"])
    assert e.value.code == 2 and "v9z:1x1" in capsys.readouterr().err
