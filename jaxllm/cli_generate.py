"""`jaxllm generate` and `jaxllm chat`: sampling from a run directory or a Hugging Face model.

Params are placed on a mesh (a run's own mesh; for --hf, all devices along fsdp) and sampled
under it, so a model larger than one device's memory still generates."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from jaxllm.data.sources import DataError


def load_hf_sharded(hf_dir: str, dtype: str | None = None):
    """(ModelConfig, params, mesh, rules) of an HF directory, its params sharded over all
    devices along fsdp (the default mesh), read as `dtype` when given."""
    from jaxllm import config, sharding
    from jaxllm.interop import hf
    mesh_cfg = config.MeshConfig()
    mesh = sharding.make_mesh(mesh_cfg)
    return (*hf.load(hf_dir, dtype=dtype, mesh=mesh, rules=mesh_cfg.rules), mesh, mesh_cfg.rules)


def as_dtype(cfg, params: dict, dtype: str | None):
    """The model held and computed in `dtype` (None: as it is): its float params cast, and
    its config's param_dtype and compute_dtype set, so that e.g. a bfloat16 model multiplies
    in bfloat16 as it was trained, with the fused CPU decode kernels' bfloat16 products."""
    if dtype is None:
        return cfg, params
    import jax.numpy as jnp
    params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                          else a, params)
    return cfg.replace(param_dtype=dtype, compute_dtype=dtype), params


def load_model(checkpoint: str | None, hf_dir: str | None, step: int | None = None,
               keep_heads: bool = False, with_mesh: bool = False, dtype: str | None = None):
    """(ModelConfig, model params, tokenizer, stop token ids) from a run or an HF directory,
    plus (mesh, rules) when with_mesh, the model in `dtype` when given (see as_dtype). A LoRA
    run's adapters are applied to its base; a reward run's "score" head is kept only with
    keep_heads (sampling uses the backbone)."""
    from jaxllm import sharding
    from jaxllm.data.tokenizer import from_pretrained, load_tokenizer
    if hf_dir:
        cfg, params, mesh, rules = load_hf_sharded(hf_dir, dtype)  # read as dtype: no 2nd copy
        cfg, params = as_dtype(cfg, params, dtype)
        tok = from_pretrained(hf_dir)
        stops = {tok.eos_id} if tok.eos_id is not None else set()
        gen = Path(hf_dir) / "generation_config.json"
        if gen.is_file():  # e.g. Llama 3 instruct ends turns with <|eot_id|>
            eos = json.loads(gen.read_text()).get("eos_token_id")
            stops |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        out = cfg, params, tok, sorted(stops)
        return out + ((mesh, rules),) if with_mesh else out
    from jaxllm.tasks import get_task
    from jaxllm.tasks.base import model_params
    from jaxllm.train.checkpoint import restore_run_params
    from jaxllm.train.loop import base_and_frozen
    exp, params = restore_run_params(checkpoint, step)
    mesh = sharding.make_mesh(exp.mesh)
    _, frozen = base_and_frozen(exp, get_task(exp.task), mesh, need_base=False)
    tok = load_tokenizer(exp.data.tokenizer, Path(checkpoint), None)
    heads = {k: v for k, v in params.items() if k == "score"} if keep_heads else {}
    cfg, params = as_dtype(exp.model, model_params(exp, params, frozen, merged=True) | heads,
                           dtype)
    out = cfg, params, tok, [tok.eos_id]
    return out + ((mesh, exp.mesh.rules),) if with_mesh else out


def _check_args(args) -> None:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise DataError("sampling options: need --max-new-tokens >= 1, --temperature >= 0, "
                        "0 < --top-p <= 1 and --top-k >= 0")


def _load(args):
    _check_args(args)
    cfg, params, tok, stops, mesh_rules = load_model(args.checkpoint, args.hf, with_mesh=True,
                                                     dtype=args.dtype)
    if "soft_prompt" in params:
        raise DataError(f"{args.checkpoint}: sampling from a prompt-tuning run is not supported "
                        "(the soft prompt cannot go through the KV cache yet)")
    return cfg, params, tok, stops, mesh_rules


def _sample(model, prompts, args, seed, on_token=None, pad_multiple=16):
    """Token ids of each prompt's continuation, stop tokens dropped."""
    from jaxllm import generate, sharding
    cfg, params, _, stops, mesh_rules = model
    longest = max(len(p) for p in prompts)
    room = cfg.max_seq_len - longest
    if room < 1:
        raise DataError(f"a prompt of {longest} tokens fills model.max_seq_len={cfg.max_seq_len}")
    with sharding.use(*mesh_rules):
        out = generate.generate(params, cfg, prompts, max_new_tokens=min(args.max_new_tokens, room),
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                key=jax.random.key(seed), stop_tokens=stops, on_token=on_token,
                                pad_multiple=pad_multiple)
    return [[int(t) for t in row[:n] if int(t) not in stops]
            for row, n in zip(out["tokens"], out["lengths"])]


def cmd_generate(args) -> None:
    model = _load(args)
    tok = model[2]
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    prompts = [bos + tok.encode(p) for p in args.prompt]
    for text, ids in zip(args.prompt, _sample(model, prompts, args, args.seed)):
        print(f"{text!r} -> {tok.decode(ids)!r}")


class _Printer:
    """Streams row 0's reply to stdout as its tokens come out. Text is printed once it
    decodes to an extension of what is shown (a partial UTF-8 character waits)."""

    def __init__(self, tok, stops):
        self.tok, self.stops, self.ids, self.shown = tok, set(stops), [], ""

    def __call__(self, tokens, emitted):
        if not emitted[0] or int(tokens[0]) in self.stops:
            return
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def finish(self, reply: str) -> None:
        print(reply[len(self.shown):] if reply.startswith(self.shown) else "\n" + reply, flush=True)


def _chat_prompt(tok, messages, max_len: int) -> list[int]:
    """The chat so far, ending with the assistant's header. The oldest turns after the system
    message are dropped while it leaves no room to reply."""
    while True:
        ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(ids) < max_len or len(users) < 2:
            break
        del messages[users[0]:users[1]]  # the oldest user turn and the replies to it
    if len(ids) >= max_len:
        raise DataError(f"chat: the conversation is {len(ids)} tokens, which leaves no room to "
                        f"reply within model.max_seq_len={max_len}")
    return ids


def cmd_chat(args) -> None:
    """Reads user turns from stdin (one per line) until EOF or /exit; streams each reply."""
    model = _load(args)
    cfg, tok, stops = model[0], model[2], model[3]
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
        prompt = _chat_prompt(tok, messages, cfg.max_seq_len)
        printer = _Printer(tok, stops)
        # The prompt grows every turn: pad it coarsely, so that turns share a compilation.
        ids = _sample(model, [prompt], args, args.seed + turn, on_token=printer, pad_multiple=64)
        reply = tok.decode(ids[0])
        printer.finish(reply)
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def add_parsers(sub) -> None:
    def common(p):
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", metavar="RUN_DIR", help="a jaxllm run directory")
        src.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
        p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                       help="hold and compute the model in this dtype (default: as stored in "
                       "the run; float32 for --hf)")

    g = sub.add_parser("generate", help="sample continuations of prompts (KV-cache sampler)")
    common(g)
    g.add_argument("--prompt", action="append", required=True, help="repeatable: one batch")
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template (stdin; "
                       "/exit or EOF ends it)")
    common(c)
    c.add_argument("--system", default=None, help="a system message to start with")
    c.set_defaults(fn=cmd_chat)
