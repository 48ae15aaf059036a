"""Post-training rows: instructions, chats, preference pairs and scored responses, from JSONL
or Parquet files.

Each row is validated (a clear error with file and line, or skipped and counted when
data.skip_malformed) and rendered to token spans [(ids, trained)], where `trained` marks the
tokens the loss sees: the completion (prompt masked), or in chats the assistant turns,
including each turn's end token. Chats use the tokenizer's chat template when it has one
(`render_chat`), else a built-in one: "<|role|>\\n" headers, each turn closed by EOS."""
from __future__ import annotations


from jaxllm.data.sources import ROW_FILES, DataError, expand, records

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def read_examples(data_cfg) -> tuple[list[list[dict]], int]:
    """Rows per source (each a normalised dict) and the number skipped as malformed."""
    fmt, skipped, per_source = data_cfg.format, 0, []
    for source in data_cfg.sources:
        rows = []
        for path in expand(source):
            if path.suffix not in ROW_FILES:
                raise DataError(f"data.sources: {path}: post-training data must be "
                                f"{' or '.join(ROW_FILES)}")
            for where, row in records(path):
                try:
                    if isinstance(row, DataError):
                        raise row
                    rows.append(normalise(row, fmt, data_cfg.fields))
                except (DataError, TypeError) as e:
                    if not data_cfg.skip_malformed:
                        raise DataError(f"{where}: {e}") from None
                    skipped += 1
        if not rows:
            raise DataError(f"data.sources: {source}: no usable {fmt} rows"
                            + (f" ({skipped} malformed skipped)" if skipped else ""))
        per_source.append(rows)
    return per_source, skipped


def _text(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise DataError(f"field {key!r}: expected a non-empty string, got {value!r}")
    return value


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"field {key!r}: expected a non-empty list of {{role, content}}")
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise DataError(f"field {key!r}: bad message {m!r} (role system/user/assistant, "
                            "content a string)")
    return value


def normalise(row: dict, fmt: str, f) -> dict:
    """One JSON row -> {"prompt": str | messages, ...} per format, or a DataError naming the
    field that is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "instruct":
        if f.messages in row:
            msgs = _messages(row[f.messages], f.messages)
            if not any(m["role"] == "assistant" for m in msgs):
                raise DataError(f"field {f.messages!r}: no assistant turn to train on")
            return {"messages": msgs}
        if f.instruction in row:
            extra = _text(row, f.input, required=False)
            prompt = ALPACA_PROMPT.format(instruction=_text(row, f.instruction),
                                          input_block=f"### Input:\n{extra}\n\n" if extra else "")
            return {"prompt": prompt, "completion": _text(row, f.output)}
        return {"prompt": _text(row, f.prompt), "completion": _text(row, f.completion)}
    if fmt == "preference":
        prompt = row.get(f.prompt)
        prompt = _messages(prompt, f.prompt) if isinstance(prompt, list) else _text(row, f.prompt)
        pair = {}
        for name, key in (("chosen", f.chosen), ("rejected", f.rejected)):
            value = row.get(key)
            if isinstance(value, list):  # chat variant: the assistant's message(s)
                value = "".join(m["content"] for m in _messages(value, key) if m["role"] == "assistant")
            pair[name] = _text({key: value}, key)
        return {"prompt": prompt, **pair}
    if fmt == "scored":
        score = row.get(f.score)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(f"field {f.score!r}: expected a number, got {score!r}")
        return {"prompt": _text(row, f.prompt), "completion": _text(row, f.response),
                "score": float(score)}
    raise DataError(f"data.format: {fmt!r} is not a post-training format")


def chat_spans(tokenizer, messages: list[dict], add_generation_prompt: bool = False):
    """[(ids, trained)] of a chat: assistant contents and their end tokens are trained."""
    if hasattr(tokenizer, "render_chat"):
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    spans = [([tokenizer.bos_id], False)] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    for m in messages:
        spans.append((tokenizer.encode(f"<|{m['role']}|>\n"), False))
        trained = m["role"] == "assistant"
        spans.append((tokenizer.encode(m["content"]) + [tokenizer.eos_id], trained))
    if add_generation_prompt:
        spans.append((tokenizer.encode("<|assistant|>\n"), False))
    return spans


def prompt_spans(tokenizer, prompt) -> list:
    """The untrained prefix: a plain prompt after BOS, or a chat up to the assistant's turn."""
    if isinstance(prompt, list):
        return [(ids, False) for ids, _ in chat_spans(tokenizer, prompt, add_generation_prompt=True)]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else []
    return [(bos + tokenizer.encode(prompt), False)]


def example_spans(tokenizer, ex: dict, completion_key: str = "completion"):
    """[(ids, trained)] of one example; the completion ends with EOS (trained)."""
    if "messages" in ex:
        return chat_spans(tokenizer, ex["messages"])
    return prompt_spans(tokenizer, ex["prompt"]) + [
        (tokenizer.encode(ex[completion_key]) + [tokenizer.eos_id], True)]
