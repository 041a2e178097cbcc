"""Chat templates rendered as Hugging Face's ``apply_chat_template`` renders them, and their per-role form.

:class:`ChatTemplate` runs the tokenizer's Jinja template under transformers'
conventions (sandboxed, ``trim_blocks`` and ``lstrip_blocks``,
``loopcontrols``, ``raise_exception``, ``strftime_now``, ``tojson``).
:class:`ChatFormat` is the same template reduced to per-role prefix and
suffix strings, for runtimes without a Jinja engine (the C runtime); the
exporter derives it and checks it against the template's own rendering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from .errors import DiJiangError, ExportError
from .names import CHAT_TEMPLATE_FILE

TOKENIZER_CONFIG = "tokenizer_config.json"

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat message. ``role`` is system, user or assistant."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DiJiangError(f"message role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise DiJiangError(f"message content must be text, got {type(self.content).__name__}")

    @classmethod
    def coerce(cls, item: "Message | dict[str, Any]") -> "Message":
        if isinstance(item, Message):
            return item
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise DiJiangError(f"a message needs 'role' and 'content', got {item!r:.80}")
        return cls(item["role"], item["content"])


def _raise_exception(message: str) -> None:
    raise DiJiangError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@dataclass
class ChatTemplate:
    """A Jinja chat template and the special tokens it may refer to."""

    source: str
    special: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except TemplateError as exc:
            raise ExportError(f"the chat template does not parse ({exc})") from exc

    def render(self, messages: Sequence[Message | dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it.

        Raises:
            DiJiangError: an empty conversation, a malformed message, or an
                error the template itself raises.
        """
        from jinja2 import TemplateError

        msgs = [Message.coerce(m) for m in messages]
        if not msgs:
            raise DiJiangError("a conversation needs at least one message")
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in msgs],
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except TemplateError as exc:
            raise DiJiangError(f"chat template failed: {exc}") from exc


_MARKS = ("\u2460sys\u2460", "\u2461usr\u2461", "\u2462ast\u2462", "\u2463usr\u2463")
#: Conversations a derived ChatFormat must render exactly as the template does.
PROBES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Hi"),),
    (("system", "Be brief."), ("user", "Hi")),
    (("user", "Hi"), ("assistant", "Hello!"), ("user", "2 + 2?")),
    (("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"), ("user", "e")),
    (("user", "line one\nline two 🎉"), ("assistant", "  spaced  ")),
)


@dataclass
class ChatFormat:
    """A chat template as strings: what comes before and after each message.

    Rendering: a conversation that starts with a system message begins with
    ``system_first_prefix``, its content and ``suffix["system"]``; one that
    does not begins with ``preamble`` (the template's default system prompt,
    or a BOS, or nothing). Every other message is ``prefix[role] + content +
    suffix[role]``; ``generation_prompt`` follows when an answer is wanted.
    """

    system_first_prefix: str
    preamble: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    version: int = 1

    def render(self, messages: Sequence[Message | dict[str, Any]], add_generation_prompt: bool = True) -> str:
        msgs = [Message.coerce(m) for m in messages]
        if not msgs:
            raise DiJiangError("a conversation needs at least one message")
        out = []
        rest = msgs
        if msgs[0].role == "system":
            out += [self.system_first_prefix, msgs[0].content, self.suffix["system"]]
            rest = msgs[1:]
        else:
            out.append(self.preamble)
        for m in rest:
            if m.role == "system":
                raise DiJiangError("a system message is supported only at the start of a conversation")
            out += [self.prefix[m.role], m.content, self.suffix[m.role]]
        if add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "system_first_prefix": self.system_first_prefix, "preamble": self.preamble,
                "prefix": dict(self.prefix), "suffix": dict(self.suffix), "generation_prompt": self.generation_prompt}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ChatFormat":
        try:
            if data.get("version") != 1:
                raise ValueError(f"version {data.get('version')!r}")
            return cls(data["system_first_prefix"], data["preamble"], dict(data["prefix"]), dict(data["suffix"]),
                       data["generation_prompt"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"malformed chat format ({exc})") from exc

    @classmethod
    def derive(cls, template: ChatTemplate) -> "ChatFormat":
        """Read the strings off ``template``'s renderings of marked conversations.

        Raises:
            ExportError: the template is not of this form (the renderings of
                :data:`PROBES` would differ), e.g. it rewrites or drops messages.
        """
        s, u, a, u2 = _MARKS

        def parts(text: str, marks: Sequence[str]) -> list[str]:
            out, at = [], 0
            for mark in marks:
                i = text.find(mark, at)
                if i < 0:
                    raise ExportError("the chat template drops or rewrites message contents")
                out.append(text[at:i])
                at = i + len(mark)
            return out + [text[at:]]

        def r(msgs, gen=False):
            return template.render([{"role": role, "content": c} for role, c in msgs], gen)

        try:
            sys_head, sys_user, user_tail = parts(r([("system", s), ("user", u)]), [s, u])
            _, _, user_ast, ast_user, _ = parts(r([("system", s), ("user", u), ("assistant", a), ("user", u2)]), [s, u, a, u2])
            *_, ast_tail = parts(r([("system", s), ("user", u), ("assistant", a)]), [s, u, a])
            head, _ = parts(r([("user", u)]), [u])
            with_gen = r([("user", u)], True)
        except DiJiangError as exc:
            raise ExportError(f"cannot read the chat template's form ({exc})") from exc
        if not user_ast.startswith(user_tail) or not ast_user.startswith(ast_tail):
            raise ExportError("the chat template's message endings depend on what follows them")
        prefix_assistant = user_ast[len(user_tail):]
        prefix_user = ast_user[len(ast_tail):]
        if not sys_user.endswith(prefix_user) or not head.endswith(prefix_user):
            raise ExportError("the chat template's user prefix depends on its position")
        fmt = cls(
            system_first_prefix=sys_head, preamble=head[: len(head) - len(prefix_user)],
            prefix={"user": prefix_user, "assistant": prefix_assistant},
            suffix={"system": sys_user[: len(sys_user) - len(prefix_user)], "user": user_tail, "assistant": ast_tail},
            generation_prompt=with_gen[len(r([("user", u)])):],
        )
        for probe in PROBES:
            for gen in (True, False):
                msgs = [{"role": role, "content": c} for role, c in probe]
                if fmt.render(msgs, gen) != template.render(msgs, gen):
                    raise ExportError("the chat template is not a fixed prefix and suffix per role")
        return fmt


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos/eos/pad/unk token strings of a ``tokenizer_config.json`` (strings or AddedToken dicts)."""
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def read_tokenizer_config(folder) -> dict[str, Any]:
    """``tokenizer_config.json`` of ``folder`` ({} when absent).

    Raises:
        ExportError: the file is not valid JSON.
    """
    from pathlib import Path

    path = Path(folder) / TOKENIZER_CONFIG
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def load_chat_template(folder) -> ChatTemplate | None:
    """The chat template of a checkpoint or export folder (``chat_template.jinja`` or the config's), or None."""
    from pathlib import Path

    folder = Path(folder)
    config = read_tokenizer_config(folder)
    if (folder / CHAT_TEMPLATE_FILE).exists():
        source = (folder / CHAT_TEMPLATE_FILE).read_text()
    elif isinstance(config.get("chat_template"), str):
        source = config["chat_template"]
    else:
        return None
    return ChatTemplate(source, special_tokens(config))
