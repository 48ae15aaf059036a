"""CLI verbs other than train: info, sweep (with skip-on-relaunch), plot."""
import csv
import json

import numpy as np
import pytest

from jaxllm import cli

TINY = ["model.vocab_size=264", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=32",
        "data.seq_len=16", "data.tokenizer.kind=byte", "train.batch_size=8",
        "logging.progress_bar=false", "train.eval_batches=1", "optimizer.warmup_steps=1"]


def test_info_preset_and_config(capsys):
    cli.main(["info", "llama3-8b"])
    out = capsys.readouterr().out
    assert "parameters: 8,030,261,248" in out and "FLOPs per token" in out and "GiB" in out
    cli.main(["info", "experiments/quickstart.yaml"])
    assert "parameters:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    (d / "docs.txt").write_text("\n\n".join(" ".join(rng.choice(["ab", "cd", "ef"], 30))
                                            for _ in range(80)))
    (d / "base.yaml").write_text("train:\n  steps: 3\ndata:\n  split_paragraphs: true\n")
    overrides = [*TINY, f"data.sources=[{d / 'docs.txt'}]", "checkpoint.enabled=false"]
    (d / "sweep.yaml").write_text(
        "base: base.yaml\nmethod: grid\n"
        f"overrides: {json.dumps(overrides)}\n"
        "parameters:\n  optimizer.lr: [0.001, 0.01]\n  optimizer.warmup_steps: [1, 2]\n")
    cli.main(["sweep", str(d / "sweep.yaml"), "--out", str(d / "out")])
    return d


def test_sweep_runs_every_point_and_writes_results(sweep_dir):
    out = sweep_dir / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["optimizer.lr"], r["optimizer.warmup_steps"]) for r in rows} == {
        ("0.001", "1"), ("0.001", "2"), ("0.01", "1"), ("0.01", "2")}
    assert all(float(r["eval_loss"]) > 0 and float(r["tokens_per_sec"]) > 0 for r in rows)
    assert (out / "results.md").read_text().count("\n") == 6
    assert (out / "curves.png").is_file()
    for r in rows:  # each point has its own run directory with its resolved config
        assert (out / r["run"] / "resolved.yaml").is_file()


def test_sweep_relaunch_skips_finished_points(sweep_dir, capsys):
    out = sweep_dir / "out"
    before = {p: p.stat().st_mtime for p in out.glob("*/metrics.jsonl")}
    cli.main(["sweep", str(sweep_dir / "sweep.yaml"), "--out", str(out)])
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime for p in out.glob("*/metrics.jsonl")} == before


def test_plot_several_runs(sweep_dir, tmp_path):
    runs = sorted(str(p) for p in (sweep_dir / "out").iterdir() if p.is_dir())
    cli.main(["plot", *runs, "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as e:
        cli.main(["plot", str(tmp_path / "nothing")])
    assert e.value.code == 2
