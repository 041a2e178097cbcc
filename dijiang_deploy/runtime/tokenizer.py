"""Text in and out of an export folder, with the Hugging Face ``tokenizers`` library.

Reads ``tokenizer.json`` (any model the library reads), the special tokens of
``tokenizer_config.json``, and the chat template (``chat_template.jinja`` or
the config's ``chat_template``), rendered by
:class:`~dijiang_deploy.contract.chat.ChatTemplate` as transformers renders it.
No transformers, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from ..contract.chat import TOKENIZER_CONFIG, Message, load_chat_template, read_tokenizer_config, special_tokens
from ..contract.errors import DiJiangError, ExportError

TOKENIZER_FILE = "tokenizer.json"
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
            raise ExportError(f"{path}: cannot read the tokenizer ({str(exc).splitlines()[0][:200]})") from exc
        config = read_tokenizer_config(folder)
        self.special = special_tokens(config)
        self.eos_token_id = self.token_id(self.special.get("eos_token"))
        self.bos_token_id = self.token_id(self.special.get("bos_token"))
        self.chat_template = load_chat_template(folder)
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


def load_tokenizer(folder: str | Path) -> TextTokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer files at all."""
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).exists() and not (folder / TOKENIZER_CONFIG).exists():
        return None
    return TextTokenizer(folder)
