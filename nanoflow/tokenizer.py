"""The model's own tokenizer and chat template (via transformers), plus streaming detokenization."""
from __future__ import annotations

import os

from tokenizers.decoders import DecodeStream

from nanoflow.models.loader import ModelSource


def load_tokenizer(src: ModelSource):
    """A transformers fast tokenizer built from the GGUF metadata or the HF directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    if src.kind == "gguf":
        return AutoTokenizer.from_pretrained(os.path.dirname(src.path), gguf_file=os.path.basename(src.path))
    if src.kind == "hf":
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any(os.path.exists(os.path.join(src.path, n)) for n in names):
            return None  # weights only: token ids in and out
        return AutoTokenizer.from_pretrained(src.path)
    return None  # dummy weights: token ids only


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; use generate() with a plain prompt")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns generated ids into text pieces; a piece never ends mid-character (DecodeStream holds bytes back)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend_tokenizer if tokenizer is not None else None
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def step(self, token_id: int) -> str:
        if self._backend is None:
            return ""
        piece = self._stream.step(self._backend, token_id) or ""
        self.text += piece
        return piece
