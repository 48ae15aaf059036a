"""`jaxllm <verb>`: train, sweep, info, plot, tokenizer, sample.

Every user mistake we can name (config, data, mesh, checkpoint) ends as a one-line
`error: ...` on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _user_errors():
    from jaxllm.config import ConfigError
    from jaxllm.data import DataError
    from jaxllm.sharding import MeshError
    from jaxllm.compile_plan import CompileError
    from jaxllm.interop.hf import HFFormatError
    from jaxllm.train.checkpoint import CheckpointError
    return (ConfigError, DataError, MeshError, CheckpointError, HFFormatError, CompileError,
            FileNotFoundError)


def cmd_train(args) -> None:
    import jax
    from jaxllm import config, distributed
    from jaxllm.train.loop import run
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    exp = config.load(args.config, args.overrides)
    result = run(exp)
    if result.get("stopped_early"):
        sys.exit(143)
    summary = ", ".join(f"{k}={result[k]:.4g}" for k in ("loss", "eval_loss", "tokens_per_sec", "mfu")
                        if k in result)
    if jax.process_index() == 0:
        print(f"done: {exp.run_dir} ({summary})")
    if exp.train.sample_prompts:  # every process takes part; only process 0 prints
        print_samples(exp, result["state"]["params"], result["tokenizer"])


def print_samples(exp, params, tokenizer) -> None:
    import jax
    from jaxllm.generate import generate
    prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in exp.train.sample_prompts]
    out = generate(params, exp.model, prompts, max_new_tokens=exp.train.sample_tokens,
                   temperature=exp.train.sample_temperature, key=jax.random.key(exp.seed),
                   stop_tokens=(tokenizer.eos_id,), top_p=0.95)
    if jax.process_index() != 0:
        return
    print("samples:")
    for text, toks, n in zip(exp.train.sample_prompts, out["tokens"], out["lengths"]):
        ids = [int(t) for t in toks[:n] if int(t) != tokenizer.eos_id]
        print(f"  {text!r} -> {tokenizer.decode(ids)!r}")


def cmd_info(args) -> None:
    from jaxllm import config, models
    if Path(args.target).is_file():
        exp = config.load(args.target, args.overrides)
        cfg, seq = exp.model, exp.data.seq_len
    else:
        exp = config.load(None, [f"model.preset={args.target}", *args.overrides])
        cfg, seq = exp.model, args.seq_len or min(exp.model.max_seq_len, 4096)
    counts = models.count_params(cfg)
    mem = models.memory_estimate(cfg)
    flops = models.flops_per_token(cfg, seq)
    print(f"model {cfg.preset or '(custom)'}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
          f"layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
          f"head_dim {cfg.dim_per_head}, mlp {cfg.intermediate_size}")
    print(f"parameters: {counts['total']:,}")
    for k in ("embedding", "lm_head", "attention", "mlp", "norms"):
        print(f"  {k:<10} {counts[k]:>16,}")
    print(f"training FLOPs per token at seq {seq}: {flops:.4g} "
          f"(6N = {6 * models.counting.matmul_params(cfg):.4g}, attention causal-halved)")
    gib = 1024**3
    print(f"memory (unsharded, no activations): params {mem['params'] / gib:.2f} GiB, grads "
          f"{mem['grads'] / gib:.2f} GiB, AdamW state {mem['optimizer'] / gib:.2f} GiB, "
          f"total {mem['total'] / gib:.2f} GiB")


def cmd_plot(args) -> None:
    from jaxllm.train.metrics import plot_runs
    for r in args.run_dirs:
        if not (Path(r) / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{r}: no metrics.jsonl (not a run directory?)")
    out = args.out or str(Path(args.run_dirs[0]) / "loss.png")
    print(plot_runs(args.run_dirs, out))


def cmd_sweep(args) -> None:
    from jaxllm.sweep import run_sweep
    run_sweep(args.sweep, args.overrides, out_dir=args.out)


def cmd_tokenizer_train(args) -> None:
    from jaxllm import config
    from jaxllm.data import read_documents, train_sentencepiece
    exp = config.load(args.config, args.overrides)
    docs = read_documents(exp.data)
    path = train_sentencepiece(docs, args.vocab_size, args.out)
    print(f"wrote {path}")


def cmd_convert(args) -> None:
    from jaxllm.interop import hf
    if sum(map(bool, (args.from_hf, args.to_hf, args.to_peft))) != 1:
        raise FileNotFoundError("convert: give exactly one of --from-hf DIR, --to-hf RUN_DIR or "
                                "--to-peft RUN_DIR")
    if args.to_peft:  # LoRA adapters or a soft prompt (and the base, when it is not HF already)
        from jaxllm.interop.peft import export_run
        print(export_run(args.to_peft, args.out, args.step))
        return
    if args.to_hf:
        from jaxllm.cli_generate import load_model
        # LoRA runs export merged (base + scale * B A); reward runs as sequence classifiers.
        cfg, params, tokenizer, _ = load_model(args.to_hf, None, step=args.step, keep_heads=True)
        if "soft_prompt" in params:
            raise hf.HFFormatError(f"convert --to-hf: {args.to_hf} is a prompt-tuning run; a plain "
                                   "Hugging Face model cannot hold its soft prompt: use --to-peft")
        if "score" in params and tokenizer.pad_id == tokenizer.eos_id:
            print(f"warning: pad_token_id = eos_token_id = {tokenizer.pad_id}: transformers reads "
                  "the score at the last token that is not padding, so pad with another id",
                  file=sys.stderr)
        tok = Path(args.to_hf) / "tokenizer.model"
        out = hf.save(cfg, params, args.out, dtype=args.dtype, pad_token_id=tokenizer.pad_id)
        if tok.is_file():
            import shutil
            shutil.copy(tok, Path(out) / "tokenizer.model")
        print(f"wrote {out}")
        return
    # HF -> a jaxllm run directory holding the weights as step 0, ready for init or resume.
    import dataclasses
    import jax
    from jaxllm import config, sharding
    from jaxllm.train.checkpoint import write_run
    seq = min(256, hf.load_config(args.from_hf).max_seq_len)
    exp = config.load(None, [f"model.init_from=hf:{args.from_hf}", f"run_dir={args.out}",
                             f"data.seq_len={seq}"])
    mesh = sharding.make_mesh(exp.mesh)
    _, params = hf.load(args.from_hf, dtype=args.dtype, mesh=mesh, rules=exp.mesh.rules)
    exp = dataclasses.replace(exp, model=exp.model.replace(param_dtype=str(
        jax.tree.leaves(params)[0].dtype)))
    write_run(exp, params, args.out)
    print(f"wrote {args.out} (jaxllm run directory, checkpoint step 0)")


def cmd_tokenizer_extend(args) -> None:
    """Base run + new-domain text -> a new run dir: extended tokenizer, grown embeddings."""
    import dataclasses
    import re
    from jaxllm.data import DataError, SentencePieceTokenizer, read_documents
    from jaxllm.train.checkpoint import CheckpointError, restore_run_params, write_run
    from jaxllm.vocab import extend_sentencepiece, resize_vocab
    exp, params = restore_run_params(args.run_dir)
    if exp.lora.rank or set(params) - {"embed_tokens", "layers", "norm", "lm_head"}:
        raise CheckpointError(f"tokenizer extend: {args.run_dir} is not a plain model run "
                              "(LoRA, prompt tuning or a reward head)")
    base_tok = Path(exp.data.tokenizer.path or Path(args.run_dir) / "tokenizer.model")
    if exp.data.tokenizer.kind != "sentencepiece" or not base_tok.is_file():
        raise FileNotFoundError(f"tokenizer extend: {args.run_dir} has no sentencepiece model")
    texts = read_documents(dataclasses.replace(exp.data, sources=tuple(args.source)))
    out = Path(args.out)
    known = SentencePieceTokenizer(base_tok).vocab_size  # rows past it are padding, if any
    try:
        model, new_ids = extend_sentencepiece(base_tok, texts, args.pieces, out / "tokenizer.model")
    except DataError as e:
        most = re.search(r"\(at most (\d+)\)", str(e))
        if most is None:
            raise
        raise DataError(f"tokenizer extend: --pieces {args.pieces} is too many for this text "
                        f"(at most {most.group(1)})") from None
    vocab = max(exp.model.vocab_size, known + len(new_ids))
    exp = dataclasses.replace(
        exp, run_dir=str(out), model=exp.model.replace(vocab_size=vocab),
        data=dataclasses.replace(exp.data, tokenizer=dataclasses.replace(
            exp.data.tokenizer, path=str(model), vocab_size=known + len(new_ids))))
    write_run(exp, resize_vocab(params, vocab, new_ids, mean_of=known), out)
    print(f"wrote {out}: {len(new_ids)} pieces added, vocab {vocab} (new rows = mean of the old "
          "ones, old rows kept)")


def cmd_lora_extract(args) -> None:
    """A LoRA adapter of the tuned model's difference from the base (jaxllm/lora_extract.py)."""
    from jaxllm import lora_extract
    from jaxllm.config import LoraConfig
    lcfg = LoraConfig(rank=args.rank, alpha=float(args.alpha or args.rank), rslora=args.rslora,
                      targets=tuple(args.targets.split(",")))
    print(lora_extract.run(args.base, args.tuned, lcfg, args.out, args.run_dir))


def cmd_compile(args) -> None:
    from jaxllm import compile_plan, config
    exp = config.load(args.config, args.overrides)
    topology = args.topology or exp.mesh.topology
    if topology is None:
        raise config.ConfigError("jaxllm compile: give --topology (e.g. v5p:4x4x4) or a config "
                                 "with mesh.topology (a TPU mesh preset sets it)")
    slices = args.num_slices or exp.mesh.num_slices
    for remat in args.remat or [exp.model.remat]:
        p = compile_plan.plan(compile_plan.with_remat(exp, remat), topology, slices)
        print(compile_plan.describe(p))


def cmd_sample(args) -> None:
    import jax
    from jaxllm import config
    from jaxllm.data import load_tokenizer
    from jaxllm.train import step as step_lib
    from jaxllm.train.checkpoint import Checkpointer
    from jaxllm.train.optimizer import make_optimizer
    from jaxllm import sharding
    run_dir = Path(args.run_dir)
    exp = config.load(run_dir / "resolved.yaml", args.overrides)
    ckpt = Checkpointer(run_dir / "checkpoints", exp.checkpoint)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no checkpoint to sample from")
    mesh = sharding.make_mesh(exp.mesh)
    abstract = step_lib.abstract_state(exp, make_optimizer(exp.optimizer, exp.train.steps), mesh)
    state, _ = ckpt.restore(step, abstract)
    ckpt.close()
    tok = load_tokenizer(exp.data.tokenizer, run_dir, None)
    prompts = tuple(args.prompt) or exp.train.sample_prompts
    import dataclasses
    exp = dataclasses.replace(exp, train=dataclasses.replace(
        exp.train, sample_prompts=prompts, sample_tokens=args.max_new_tokens,
        sample_temperature=args.temperature))
    del jax
    print_samples(exp, state["params"], tok)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxllm", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train from a YAML experiment config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    t.add_argument("--coordinator", help="HOST:PORT of process 0, for a multi-process run")
    t.add_argument("--num-processes", type=int)
    t.add_argument("--process-id", type=int)
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sweep", help="run a hyperparameter sweep file")
    s.add_argument("sweep")
    s.add_argument("overrides", nargs="*", help="overrides applied to every point")
    s.add_argument("--out", help="sweep directory (default: from the sweep file)")
    s.set_defaults(fn=cmd_sweep)

    i = sub.add_parser("info", help="parameter count, FLOPs and memory of a config or preset")
    i.add_argument("target", help="a YAML config or a model preset name")
    i.add_argument("overrides", nargs="*")
    i.add_argument("--seq-len", type=int, default=None)
    i.set_defaults(fn=cmd_info)

    pl = sub.add_parser("plot", help="loss curves of one or more run directories to PNG")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("--out")
    pl.set_defaults(fn=cmd_plot)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="tokverb", required=True)
    tt = tks.add_parser("train", help="train a sentencepiece model on a config's data sources")
    tt.add_argument("config")
    tt.add_argument("overrides", nargs="*")
    tt.add_argument("--vocab-size", type=int, default=2048)
    tt.add_argument("--out", required=True, help="model prefix; writes PREFIX.model")
    tt.set_defaults(fn=cmd_tokenizer_train)
    te = tks.add_parser("extend", help="add a new domain's pieces to a run's tokenizer and grow "
                        "its embeddings into a new run directory")
    te.add_argument("run_dir")
    te.add_argument("--source", action="extend", nargs="+", required=True,
                    help="new-domain text files or globs")
    te.add_argument("--pieces", type=int, default=1000, help="size of the new-domain model")
    te.add_argument("--out", required=True)
    te.set_defaults(fn=cmd_tokenizer_extend)

    lo = sub.add_parser("lora", help="LoRA tools")
    los = lo.add_subparsers(dest="lora_verb", required=True)
    le = los.add_parser("extract", help="truncated-SVD LoRA of a fine-tune's difference from its base")
    le.add_argument("--base", required=True, help="run:DIR or hf:DIR")
    le.add_argument("--tuned", required=True, help="run:DIR or hf:DIR (same shape)")
    le.add_argument("--rank", type=int, required=True)
    le.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    le.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    le.add_argument("--rslora", action="store_true", help="scale alpha/sqrt(rank)")
    le.add_argument("--out", required=True, help="the adapter in PEFT's format")
    le.add_argument("--run-dir", default=None,
                    help="also a jaxllm LoRA run over the base (for generate, convert, training)")
    le.set_defaults(fn=cmd_lora_extract)

    cv = sub.add_parser("convert", help="Hugging Face <-> jaxllm checkpoints")
    cv.add_argument("--from-hf", help="a local HF model directory (config.json + safetensors)")
    cv.add_argument("--to-hf", help="a jaxllm run directory (its latest checkpoint)")
    cv.add_argument("--to-peft", help="a LoRA or prompt-tuning run directory: its adapter in "
                    "PEFT's format (and its base in HF format under OUT/base unless it is HF)")
    cv.add_argument("--out", required=True)
    cv.add_argument("--step", type=int, default=None, help="with --to-hf: this step, not the latest")
    cv.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16")
    cv.set_defaults(fn=cmd_convert)

    co = sub.add_parser("compile", help="AOT-compile the train step for a TPU topology: memory plan")
    co.add_argument("config")
    co.add_argument("overrides", nargs="*")
    co.add_argument("--topology", help='e.g. "v5e:4x4", "v5p:4x4x4" (default: mesh.topology)')
    co.add_argument("--num-slices", type=int, help="TPU slices (default: mesh.num_slices)")
    co.add_argument("--remat", action="append", help="compare remat policies (repeatable)")
    co.set_defaults(fn=cmd_compile)

    sa = sub.add_parser("sample", help="sample continuations from a run's latest checkpoint")
    sa.add_argument("run_dir")
    sa.add_argument("overrides", nargs="*")
    sa.add_argument("--prompt", action="append", default=[])
    sa.add_argument("--max-new-tokens", type=int, default=64)
    sa.add_argument("--temperature", type=float, default=0.0)
    sa.set_defaults(fn=cmd_sample)

    from jaxllm.cli_generate import add_parsers
    add_parsers(sub)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
