"""Chat templates: render a conversation into a prompt string, the way transformers does.

A chat template is Jinja source that ships with the model (GGUF key `tokenizer.chat_template`,
or `chat_template` in a Hugging Face directory). Templates come from model hubs, so they are
untrusted code: they run in Jinja's immutable sandbox, with the same environment transformers
gives them, so a prompt rendered here is byte-identical to transformers'
`apply_chat_template(..., tokenize=False)`:

    trim_blocks, lstrip_blocks, loopcontrols     environment options
    raise_exception(msg), strftime_now(fmt)       globals
    tojson (no HTML escaping, ensure_ascii=False) filter
    {% generation %}...{% endgeneration %}        accepted, renders its body
    messages, add_generation_prompt, tools,       variables, plus the model's special tokens
    documents, bos_token, eos_token, ...          (bos_token, eos_token, unk_token, pad_token)

The rendered prompt already contains the special tokens the template writes (`<|im_start|>`,
often `bos_token`), so encode it with `add_special_tokens=False`, as transformers does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning may arrive under; templates read `reasoning_content` or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}` marks assistant text for training masks; for inference it is a no-op."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a set)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """`dict(...)` for templates, without exposing the `dict` type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no reaching into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set attribute {name!r} on a namespace"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile template source once; the compiled template is immutable and safe to share."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox sees no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, numpy scalars) are cut back to the base type and lose their methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (
            [_plain(v) for v in value]
            if isinstance(value, list)
            else tuple(_plain(v) for v in value)
        )
    if callable(getattr(value, "model_dump", None)):  # pydantic models, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Drop keys whose value is None (APIs send `content=None`), alias reasoning field names."""
    out = []
    for message in messages:
        if callable(getattr(message, "model_dump", None)):  # pydantic, e.g. OpenAI SDK messages
            message = cast(Any, message).model_dump()
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        msg = {k: v for k, v in message.items() if v is not None}
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(_plain(msg))
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **variables: Any,
) -> str:
    """Render `messages` with `template`; `variables` (special tokens, template options) are extra
    template variables. Raises ValueError on an empty conversation, and jinja2.TemplateError when
    the template rejects the conversation (`raise_exception`)."""
    if len(messages) == 0:
        raise ValueError("cannot apply a chat template to an empty conversation")
    compiled = compile_chat_template(template)
    return compiled.render(
        messages=_normalize_messages(messages),
        tools=_plain(tools),
        documents=_plain(documents),
        add_generation_prompt=add_generation_prompt,
        **_plain(variables),
    )
