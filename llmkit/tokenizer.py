"""Tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template of its model.

Chat templates come from files (tokenizer_config.json, GGUF metadata), so they are rendered in
Jinja2's immutable sandbox, configured as transformers renders them (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, `tojson`): a template cannot reach Python objects or the file
system.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

from .errors import LlmkitError


class TemplateError(LlmkitError):
    """A chat template that fails to render (or raises on purpose through raise_exception)."""


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_tokens: Iterable[str] = (),
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_tokens = [t for t in eos_tokens if t]
        self.chat_template = chat_template
        self.add_bos = add_bos and bos_token is not None
        unknown = [t for t in [bos_token, *self.eos_tokens] if t and backend.token_to_id(t) is None]
        if unknown:
            raise LlmkitError(f"special token(s) {unknown} are not in the vocabulary")
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_ids = {backend.token_to_id(t) for t in self.eos_tokens}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a BOS is prepended when the model expects one."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
        tokenize: bool = False, **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise LlmkitError("this tokenizer has no chat template; use a plain prompt (--no-chat)")
        from jinja2 import TemplateError as JinjaError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            text = env.from_string(self.chat_template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_tokens[0] if self.eos_tokens else "",
                **kwargs,
            )
        except JinjaError as exc:
            raise TemplateError(f"chat template failed to render: {type(exc).__name__}: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer | None:
        """tokenizer.json + tokenizer_config.json (+ generation_config.json's eos ids); None if absent."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")

        def token(value: Any) -> str | None:
            return value.get("content") if isinstance(value, dict) else value

        eos = [token(cfg.get("eos_token"))]
        gen_eos = gen.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []:
            eos.append(backend.id_to_token(i))
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():  # where transformers 5 saves it
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_token=token(cfg.get("bos_token")), eos_tokens=dict.fromkeys(e for e in eos if e),
                   chat_template=template, add_bos=bool(cfg.get("add_bos_token", False)))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LlmkitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
