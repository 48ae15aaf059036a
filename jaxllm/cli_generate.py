"""`jaxllm generate` and `jaxllm chat`: sampling from a run directory or a Hugging Face model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax


def load_model(checkpoint: str | None, hf_dir: str | None, step: int | None = None,
               keep_heads: bool = False):
    """(ModelConfig, model params, tokenizer, stop token ids) from a run or an HF directory.
    A LoRA run's adapters are applied to its base; a reward run's "score" head is kept only
    with keep_heads (sampling uses the backbone)."""
    if hf_dir:
        from jaxllm.data.hf_tokenizer import HFTokenizer
        from jaxllm.interop import hf
        cfg, params = hf.load(hf_dir)
        tok = HFTokenizer(hf_dir)
        stops = {tok.eos_id} if tok.eos_id is not None else set()
        gen = Path(hf_dir) / "generation_config.json"
        if gen.is_file():  # e.g. Llama 3 instruct ends turns with <|eot_id|>
            eos = json.loads(gen.read_text()).get("eos_token_id")
            stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cfg, params, tok, sorted(stops)
    from jaxllm import sharding
    from jaxllm.data import load_tokenizer
    from jaxllm.tasks import get_task
    from jaxllm.tasks.base import model_params
    from jaxllm.train.checkpoint import restore_run_params
    from jaxllm.train.loop import base_and_frozen
    exp, params = restore_run_params(checkpoint, step)
    task = get_task(exp.task)
    _, frozen = base_and_frozen(exp, task, sharding.make_mesh(exp.mesh), need_base=False)
    tok = load_tokenizer(exp.data.tokenizer, Path(checkpoint), None)
    heads = {k: v for k, v in params.items() if k == "score"} if keep_heads else {}
    return exp.model, model_params(exp, params, frozen) | heads, tok, [tok.eos_id]


def _sample(cfg, params, prompts, stops, args, seed):
    from jaxllm import generate
    room = cfg.max_seq_len - max(len(p) for p in prompts)
    if room < 1:
        raise ValueError(f"prompt of {max(len(p) for p in prompts)} tokens fills "
                         f"model.max_seq_len={cfg.max_seq_len}")
    out = generate.generate(params, cfg, prompts, max_new_tokens=min(args.max_new_tokens, room),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            key=jax.random.key(seed), stop_tokens=stops)
    return [[int(t) for t in row[:n] if int(t) not in stops]
            for row, n in zip(out["tokens"], out["lengths"])]


def cmd_generate(args) -> None:
    cfg, params, tok, stops = load_model(args.checkpoint, args.hf)
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    prompts = [bos + tok.encode(p) for p in args.prompt]
    for text, ids in zip(args.prompt, _sample(cfg, params, prompts, stops, args, args.seed)):
        print(f"{text!r} -> {tok.decode(ids)!r}")


def cmd_chat(args) -> None:
    """Reads user turns from stdin (one per line) until EOF or /exit; prints each reply."""
    from jaxllm.data.examples import chat_spans
    cfg, params, tok, stops = load_model(args.checkpoint, args.hf)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive, turn = sys.stdin.isatty(), 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        prompt = [i for ids, _ in chat_spans(tok, messages, add_generation_prompt=True) for i in ids]
        reply = tok.decode(_sample(cfg, params, [prompt], stops, args, args.seed + turn)[0])
        messages.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        turn += 1


def add_parsers(sub) -> None:
    def common(p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", metavar="RUN_DIR", help="a jaxllm run directory")
        src.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)

    g = sub.add_parser("generate", help="sample continuations of prompts (KV-cache sampler)")
    common(g)
    g.add_argument("--prompt", action="append", required=True, help="repeatable: one batch")
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template (stdin)")
    common(c)
    c.add_argument("--system", default=None, help="a system message to start with")
    c.set_defaults(fn=cmd_chat)
