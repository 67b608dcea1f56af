"""Tokenizers: a checkpoint's tokenizer.json (through `tokenizers`), or bytes for random weights.

Both expose the same small surface the engine uses: `encode`, `decode`, `bos_token_id`,
`eos_token_id`, `stop_token_ids` (every id that ends a generation) and `apply_chat_template`
(the checkpoint's Jinja template, rendered like transformers does, or a plain fallback).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizerImpl

from nexus_tune.engine.config import ModelConfig

# Used when a checkpoint has no chat template (and for random weights).
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **special: Any) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


class _ChatMixin:
    """apply_chat_template for a tokenizer with `encode`, `chat_template`, `bos_token`, `eos_token`."""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        """The prompt text for a chat; with tokenize=True its ids (no extra BOS: templates write their own)."""
        text = _render_chat(self.chat_template, messages, add_generation_prompt,
                            bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, add_special_tokens=False) if tokenize else text


class HFTokenizer(_ChatMixin):
    """tokenizer.json plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, folder: str | Path, config: ModelConfig):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
        self._tok = HFTokenizerImpl.from_file(str(path))
        tok_config = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else tok_config.get("chat_template")
        self.chat_template = template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE
        self.bos_token = _token_text(tok_config.get("bos_token"))
        self.eos_token = _token_text(tok_config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else config.bos_token_id
        gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id", [])
        stop = set(config.eos_token_ids) | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None:
            stop.add(eos_id)
        self.eos_token_id = eos_id if eos_id is not None else (min(stop) if stop else None)
        self.stop_token_ids = frozenset(stop)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class ByteTokenizer(_ChatMixin):
    """UTF-8 bytes are ids 0..255; the config's BOS/EOS ids are the special tokens.

    A random-weight model samples from its whole vocabulary, so any other id decodes to one
    printable ASCII character: every generated token then shows as exactly one character, and
    re-encoding the text counts the tokens right (what a serving benchmark does).
    """

    def __init__(self, config: ModelConfig):
        self.bos_token_id = config.bos_token_id
        self.stop_token_ids = frozenset(config.eos_token_ids)
        self.eos_token_id = config.eos_token_ids[0] if config.eos_token_ids else None
        self._special = {i for i in (self.bos_token_id, *config.eos_token_ids) if i is not None}
        self._add_bos = config.model_type == "llama"  # as the real tokenizers do
        self.vocab_size = config.vocab_size
        self.chat_template = DEFAULT_CHAT_TEMPLATE
        self.bos_token = self.eos_token = ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos = [self.bos_token_id] if add_special_tokens and self._add_bos and self.bos_token_id is not None else []
        return bos + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i in self._special:
                if not skip_special_tokens:
                    out += f"<|{i}|>".encode()
            else:
                out.append(i if i < 256 else 32 + i % 95)
        return out.decode("utf-8", errors="replace")


Tokenizer = HFTokenizer | ByteTokenizer


def load_tokenizer(model: str | ModelConfig, config: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer for a folder, the byte tokenizer for a preset or a bare config."""
    return HFTokenizer(model, config) if isinstance(model, str) and Path(model).is_dir() else ByteTokenizer(config)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str:
    """tokenizer_config writes special tokens as a string or as {"content": ...}."""
    return token.get("content", "") if isinstance(token, dict) else (token or "")
