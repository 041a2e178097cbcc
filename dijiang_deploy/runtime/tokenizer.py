"""Text in and out of an export folder, with the Hugging Face ``tokenizers`` library.

Reads ``tokenizer.json`` (any model the library reads), the special tokens of
``tokenizer_config.json``, and the chat template (``chat_template.jinja`` or
the config's ``chat_template``), rendered with Jinja2 under the conventions
of Hugging Face's ``apply_chat_template`` (sandboxed, ``trim_blocks`` and
``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``),
so a conversation renders to the same text as transformers renders it.
No transformers, no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..contract.errors import DiJiangError, ExportError
from ..contract.names import CHAT_TEMPLATE_FILE

TOKENIZER_FILE = "tokenizer.json"
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
            raise ExportError(f"the chat template does not parse ({exc})") from None

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
            raise DiJiangError(f"chat template failed: {exc}") from None


class TextTokenizer:
    """Token ids <-> text for one export folder.

    Args:
        folder: folder with ``tokenizer.json`` (and usually
            ``tokenizer_config.json`` and a chat template).

    Raises:
        ExportError: a config without its ``tokenizer.json``, or files the
            library cannot read.
    """

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.exists():
            raise ExportError(
                f"{folder}: {TOKENIZER_CONFIG} but no {TOKENIZER_FILE}; copy it from the checkpoint, "
                "or pass token ids (load_tokenizer=False)"
            )
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception
            raise ExportError(f"{path}: cannot read the tokenizer ({str(exc).splitlines()[0][:200]})") from None
        config: dict[str, Any] = {}
        cfg_path = folder / TOKENIZER_CONFIG
        if cfg_path.exists():
            try:
                config = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ExportError(f"{cfg_path}: not valid JSON ({exc})") from None
        self.special = {
            key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
            if _token_text(config.get(key)) is not None
        }
        self.eos_token_id = self.token_id(self.special.get("eos_token"))
        self.bos_token_id = self.token_id(self.special.get("bos_token"))
        template = None
        if (folder / CHAT_TEMPLATE_FILE).exists():
            template = (folder / CHAT_TEMPLATE_FILE).read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        self.chat_template = ChatTemplate(template, self.special) if template else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` itself."""
        return self._tok

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, special-token markup recognised, nothing added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message | dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise DiJiangError("this tokenizer has no chat template; send plain text instead of messages")
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message | dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_tokenizer(folder: str | Path) -> TextTokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer files at all."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).exists() and not (folder / TOKENIZER_CONFIG).exists():
        return None
    return TextTokenizer(folder)
