"""Experiment configuration: frozen dataclasses filled from YAML plus dotted overrides.

`load(path, overrides)` reads a YAML file with yaml.safe_load semantics, applies `a.b.c=value`
overrides (values parsed as YAML scalars/lists, never eval'd), resolves `model.preset`, checks
every key and type, and returns an `Experiment`. Errors are `ConfigError`s that name the file,
the line and the dotted key, and suggest the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxllm.models.config import ModelConfig, RopeScaling  # noqa: F401  (re-exported)


class ConfigError(ValueError):
    """A config problem, with where it is (file:line, dotted key) in the message."""


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class AxisSizes:
    """Size of each mesh axis; exactly one -1 (over ici and dcn together) fills the rest."""
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axes. Params use the plain names, activations the act_* names."""
    embed: tuple[str, ...] = ("fsdp", "sequence")
    mlp: tuple[str, ...] = ("tensor",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    vocab: tuple[str, ...] = ("tensor",)
    head_dim: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    norm: tuple[str, ...] = ()
    act_batch: tuple[str, ...] = ("data", "fsdp")
    act_length: tuple[str, ...] = ("sequence",)
    act_embed: tuple[str, ...] = ()
    act_heads: tuple[str, ...] = ("tensor",)
    act_kv_heads: tuple[str, ...] = ("tensor",)
    act_mlp: tuple[str, ...] = ("tensor",)
    act_vocab: tuple[str, ...] = ("tensor",)


@dataclass(frozen=True)
class MeshConfig:
    preset: str | None = None  # a name in jaxllm/mesh_presets.py; keys given beside it win
    ici: AxisSizes = AxisSizes(fsdp=-1)
    dcn: AxisSizes = AxisSizes()
    rules: ShardingRules = ShardingRules()
    devices: int | None = None  # the device count this mesh is meant for (checked at start)
    topology: str | None = None  # TPU topology (e.g. "v5p:4x4x4"): the default of jaxllm compile
    num_slices: int = 1  # TPU slices (the compile plan's default)


@dataclass(frozen=True)
class TokenizerConfig:
    # "byte": 256 bytes + specials; "sentencepiece": `path`, or trained on the train split into the
    # run directory when `path` is null; "hf": a tokenizer.json file or directory at `path`.
    kind: Literal["byte", "sentencepiece", "hf"] = "byte"
    path: str | None = None
    vocab_size: int = 2048  # when training a sentencepiece model
    add_bos: bool = True
    add_eos: bool = True


@dataclass(frozen=True)
class FieldNames:
    """Row field names, remappable per dataset (e.g. chosen: selected)."""
    prompt: str = "prompt"
    completion: str = "completion"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    response: str = "response"
    score: str = "score"


@dataclass(frozen=True)
class DataConfig:
    # Each source: "builtin:pydoc" (the text of Python's pydoc_data.topics), a .txt file (one
    # document per file, or per blank-line-separated paragraph block with split_paragraphs), or a
    # .jsonl file with a text field. Globs are allowed.
    sources: tuple[str, ...] = ("builtin:pydoc",)
    text_field: str = "text"
    split_paragraphs: bool = False
    eval_fraction: float = 0.05  # documents held out for eval (chosen by a seeded hash)
    tokenizer: TokenizerConfig = TokenizerConfig()
    seq_len: int = 256
    num_workers: int = 0  # grain threads preparing batches ahead (0: in the training thread)
    # Post-training formats (JSONL; see jaxllm/data/examples.py): "instruct" rows are alpaca
    # {instruction, input, output}, chat {messages}, or {prompt, completion}; "preference" rows
    # {prompt, chosen, rejected}; "scored" rows {prompt, response, score}.
    format: Literal["text", "instruct", "preference", "scored"] = "text"
    fields: FieldNames = FieldNames()
    weights: tuple[float, ...] = ()  # sampling weight per source (a mixture); () = equal
    skip_malformed: bool = False  # count and skip bad rows instead of stopping at the first
    pack: bool = True  # instruct: several examples per row (segment ids keep them apart)


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine/linear)
    weight_decay: float = 0.1  # not applied to norms, biases, or other 1-d params
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    z_loss: float = 0.0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    resume: bool = False
    peak_flops_per_device: float | None = None  # None: table by device kind, measured on CPU
    sample_prompts: tuple[str, ...] = ()
    sample_tokens: int = 48
    sample_temperature: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 100
    keep: int = 2
    async_save: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    plot: bool = True


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the named projections; rank 0 trains all weights instead."""
    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj")
    rslora: bool = False  # scale alpha/sqrt(rank) instead of alpha/rank
    dropout: float = 0.0  # on the adapters' input during training steps (PEFT's lora_dropout)
    base_dtype: Literal["param", "bfloat16", "int8"] = "param"  # int8: per-channel QLoRA-style


@dataclass(frozen=True)
class PromptTuningConfig:
    """A learned soft prompt of num_tokens vectors before every row; the model stays frozen.
    Use with unpacked rows (data.pack=false): the prompt belongs to each row's first example."""
    num_tokens: int = 0


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid only: robust DPO with noisy preference labels
    reference_free: bool = False  # the reference log-probs are taken as 0
    # One pass of the reference over the data before training (stored in the run directory);
    # the loss then reads them, and full fine-tuning keeps no frozen copy in memory.
    precompute_reference: bool = False
    sft_weight: float = 0.0  # + w * per-token NLL of the chosen answers (RPO; TRL's rpo_alpha)


@dataclass(frozen=True)
class RewardConfig:
    loss: Literal["pairwise", "regression"] = "pairwise"
    margin: float = 0.0
    center_coef: float = 0.0  # + c * mean((r_chosen + r_rejected)^2) keeps rewards centred


@dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = None  # hf:DIR or run:DIR with the same tokenizer
    kl: Literal["forward", "reverse"] = "forward"
    temperature: float = 1.0
    sft_weight: float = 0.0  # mix in next-token cross-entropy on the data


@dataclass(frozen=True)
class Experiment:
    name: str = "run"
    run_dir: str = "runs/run"
    seed: int = 0
    task: Literal["pretrain", "sft", "dpo", "reward", "distill"] = "pretrain"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    lora: LoraConfig = LoraConfig()
    prompt_tuning: PromptTuningConfig = PromptTuningConfig()
    dpo: DPOConfig = DPOConfig()
    reward: RewardConfig = RewardConfig()
    distill: DistillConfig = DistillConfig()


# ----------------------------------------------------------------------------- YAML with lines

def _compose(text: str, source: str) -> tuple[Any, dict[str, str]]:
    """safe_load the text, also returning {dotted key: "file:line"} for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = f"{source}:{k.start_mark.line + 1}"
                walk(v, key)
    if node is not None:
        walk(node, "")
    return yaml.safe_load(text), lines


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = tree.get(p)
        if not isinstance(nxt, dict):
            nxt = tree[p] = {}
        tree = nxt
    tree[parts[-1]] = value


# ----------------------------------------------------------------------------- typed build

def _where(key: str, lines: dict[str, str], source: str) -> str:
    return f"{lines.get(key, source)}: {key}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, here) -> Any:
    """Check/convert one value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, here)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], 1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{here(key)}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{here(key)}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]", here) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{here(key)}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, key, here)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{here(key)}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, raw: dict, prefix: str, here):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            near = difflib.get_close_matches(str(k), names, 1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            raise ConfigError(f"{here(key)}: unknown key{hint} (valid: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key, here)
    return cls(**kwargs)


def _resolve_mesh_preset(raw: dict, here) -> dict:
    """Mesh fields from mesh.preset, then the user's (ici/dcn axes merged one by one)."""
    mesh = raw.get("mesh")
    if not isinstance(mesh, dict) or mesh.get("preset") is None:
        return raw
    from jaxllm.mesh_presets import MESH_PRESETS, resolve
    name = mesh["preset"]
    if name not in MESH_PRESETS:
        near = difflib.get_close_matches(str(name), list(MESH_PRESETS), 1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{here('mesh.preset')}: unknown mesh preset {name!r}{hint} "
                          f"(known: {', '.join(MESH_PRESETS)})")
    base = resolve(name)
    for key, value in mesh.items():
        if key in ("ici", "dcn") and isinstance(value, dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {**raw, "mesh": base}


def _resolve_preset(raw: dict, here) -> dict:
    """Model fields from the preset, then from an hf: init_from's config.json, then the user's."""
    raw = _resolve_mesh_preset(raw, here)
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    base: dict = {}
    name = model.get("preset")
    if name is not None:
        from jaxllm.models.presets import PRESETS
        if name not in PRESETS:
            near = difflib.get_close_matches(str(name), list(PRESETS), 1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{here('model.preset')}: unknown preset {name!r}{hint} "
                              f"(known: {', '.join(PRESETS)})")
        base = _to_plain(PRESETS[name])
    init = model.get("init_from")
    if isinstance(init, str) and init.startswith("hf:"):
        from jaxllm.interop.hf import HFFormatError, load_config
        try:
            base.update(_to_plain(load_config(init[3:])))
        except HFFormatError as e:
            raise ConfigError(f"{here('model.init_from')}: {e}") from None
    elif init is not None and not (isinstance(init, str) and init.startswith("run:")):
        raise ConfigError(f"{here('model.init_from')}: expected 'hf:DIR' or 'run:DIR', got {init!r}")
    if not base:
        return raw
    base.update(model)
    return {**raw, "model": base}


def from_dict(raw: dict, source: str = "<dict>", lines: dict[str, str] | None = None) -> Experiment:
    lines = lines or {}
    here = lambda key: _where(key, lines, source)  # noqa: E731
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    exp = _build(Experiment, _resolve_preset(raw, here), "", here)
    try:
        exp.model.validate()
    except ValueError as e:
        key = str(e).split(":", 1)[0]
        raise ConfigError(f"{here(key)}: {str(e).split(':', 1)[1].strip()}") from None
    tr = exp.train
    if tr.batch_size % tr.grad_accum:
        raise ConfigError(f"{here('train.grad_accum')}: {tr.grad_accum} does not divide "
                          f"train.batch_size={tr.batch_size}")
    if not 0.0 <= exp.lora.dropout < 1.0:
        raise ConfigError(f"{here('lora.dropout')}: {exp.lora.dropout} is not in [0, 1)")
    if exp.dpo.precompute_reference and exp.dpo.reference_free:
        raise ConfigError(f"{here('dpo.precompute_reference')}: nothing to precompute with "
                          "dpo.reference_free=true")
    if exp.data.seq_len % exp.model.loss_chunks:
        raise ConfigError(f"{here('model.loss_chunks')}: {exp.model.loss_chunks} does not divide "
                          f"data.seq_len={exp.data.seq_len}")
    if exp.data.seq_len > exp.model.max_seq_len:
        raise ConfigError(f"{here('data.seq_len')}: {exp.data.seq_len} exceeds "
                          f"model.max_seq_len={exp.model.max_seq_len}")
    return exp


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read an experiment from YAML (or defaults when path is None) plus `a.b=value` overrides."""
    raw, lines, source = {}, {}, "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        source = str(path)
        raw, lines = _compose(path.read_text(), source)
        raw = raw or {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        lines[key] = "command-line override"
    return from_dict(raw, source, lines)


def _to_plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def to_yaml(exp: Experiment) -> str:
    return yaml.safe_dump(_to_plain(exp), sort_keys=False)


def save_resolved(exp: Experiment, run_dir: str | Path) -> Path:
    out = Path(run_dir) / "resolved.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(exp))
    tmp.replace(out)
    return out
