"""Chat templates, rendered as transformers renders them, and the assistant turns found in the
rendered text (SFT trains on those tokens only).

A template is Jinja (tokenizer_config.json's "chat_template", or chat_template.jinja). It is
rendered like transformers' apply_chat_template: a sandboxed environment with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a JSON `tojson`, the
tokenizer's named special tokens as variables, and the `{% generation %}` block that marks
assistant text. A tokenizer without a template uses FALLBACK_TEMPLATE.

Every tokenizer in jaxllm.data mixes in `ChatMixin`; it provides `special_tokens` (name ->
text, e.g. {"eos_token": "</s>"}), `chat_template` (or None) and `encode_special(text)`, which
encodes rendered text with special-token strings mapped to their ids."""
from __future__ import annotations

import functools
import json
import re
import threading
from datetime import datetime

from jaxllm.data.sources import DataError

# "<|role|>\n" headers; each turn ends with EOS, so a model trained on it stops by itself.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# transformers' named special tokens (`special_tokens_map`): the variables templates may use.
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: records where the block's text lands in
        the output. `render` puts the output so far (chunks) and the spans list in `local`
        (per thread: data pipelines may render chats in several threads at once)."""
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            self.local = threading.local()

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            start = sum(map(len, self.local.chunks))
            self.local.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # JSON, not jinja's HTML-escaping tojson (transformers overrides it the same way)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template: line {e.lineno}: {e.message}") from None
    tracker = next(x for x in env.extensions.values() if isinstance(x, Generation))
    return compiled, tracker


def _plain_messages(messages) -> list[dict]:
    """Copies without None values (templates handle a missing key, not a None one), and with
    reasoning under the names templates read, as transformers passes them."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise DataError(f"chat: a message must be a dict with role and content, got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m),
                         None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(template: str, messages, *, add_generation_prompt: bool = False,
           special_tokens: dict | None = None, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the rendered chat and the character spans of its `{% generation %}`
    blocks (empty when the template has none). kwargs become template variables (e.g. tools)."""
    import jinja2
    compiled, tracker = _compile(template)
    context = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    chunks, spans = [], []
    tracker.local.chunks, tracker.local.spans = chunks, spans
    try:
        for chunk in compiled.generate(messages=_plain_messages(messages),
                                       add_generation_prompt=add_generation_prompt, **context):
            chunks.append(chunk)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"chat template: {e}") from None
    return "".join(chunks), spans


class ChatMixin:
    """apply_chat_template / assistant_spans / render_chat / encode_chat for a tokenizer."""
    chat_template: str | None = None
    special_tokens: dict = {}

    def encode_special(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def template(self) -> str:
        return self.chat_template or FALLBACK_TEMPLATE

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, **kwargs) -> str:
        """The chat as text: transformers' apply_chat_template(..., tokenize=False)."""
        return render(self.template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.special_tokens, **kwargs)[0]

    def assistant_spans(self, messages, add_generation_prompt: bool = False):
        """(text, [(start, end)]): the rendered chat and the character span of each assistant
        turn in it, its end-of-turn marker included. Taken from `{% generation %}` blocks when
        the template has them; otherwise each assistant turn is the text that rendering
        messages[:i+1] adds to messages[:i] rendered with a generation prompt (its header)."""
        text, marked = render(self.template, messages, add_generation_prompt=add_generation_prompt,
                              special_tokens=self.special_tokens)
        if _GENERATION_TAG.search(self.template):
            return text, marked
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            head = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            turn = self.apply_chat_template(messages[: i + 1])
            if not (turn.startswith(head) and text.startswith(turn)):
                raise DataError("chat template: earlier turns render differently as the chat "
                                "grows, so assistant turns cannot be located (mark them with "
                                "{% generation %} ... {% endgeneration %} in the template)")
            spans.append((len(head), len(turn)))
        return text, spans

    def render_chat(self, messages, add_generation_prompt: bool = False):
        """[(ids, trained)]: the chat's tokens in pieces; assistant turns are trained. Text is
        cut only where a trained span starts or ends, and special-token strings written by the
        template (or the messages) become their ids, as transformers tokenizes a chat."""
        text, spans = self.assistant_spans(messages, add_generation_prompt)
        pieces, pos = [], 0
        for start, end in sorted(spans):
            start = max(start, pos)
            pieces += [(text[pos:start], False), (text[start:end], True)]
            pos = max(pos, end)
        pieces.append((text[pos:], False))
        return [(self.encode_special(t), trained) for t, trained in pieces if t]

    def encode_chat(self, messages, add_generation_prompt: bool = False):
        """(ids, mask): the chat's token ids and 1 where the token is an assistant turn's."""
        ids, mask = [], []
        for piece, trained in self.render_chat(messages, add_generation_prompt):
            ids += piece
            mask += [int(trained)] * len(piece)
        return ids, mask


def split_special(text: str, specials: dict[str, int]):
    """Yield str pieces of text and int ids where a special-token string occurs (longest
    first, so "<|im_end|>" is not read as a shorter token it contains)."""
    if not specials:
        yield text
        return
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()]
        yield specials[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:]
