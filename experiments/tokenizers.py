"""Tokenizers: byte-level (the default, vocab 256) and Hugging Face `tokenizers` files or hub ids.

Any tokenizer.json works, for data (data.tokenizer=...) and generation; the released BlackMamba and Mamba
models use GPT-NeoX's (hub id EleutherAI/gpt-neox-20b). The `tokenizers` package is optional
(`pip install -e '.[hf]'`) and imported only when an HF tokenizer is asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

HF_EXTRA_HINT = "data=hf needs the 'hf' extra: pip install -e '.[hf]'"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, one token per byte, so bits/token == bits/byte."""

    vocab_size: int = 256
    bytes_per_token: float | None = 1.0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A window can start or end inside a multi-byte character: show U+FFFD rather than fail.
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from a tokenizer.json file, a folder holding one, or a hub id.

    `bytes_per_token` is None: it depends on the text, so the data source measures it on its val split.
    """

    bytes_per_token: float | None = None

    def __init__(self, path_or_name: str) -> None:
        tokenizers = _import_tokenizers()
        path = Path(path_or_name).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
            if not path.is_file():
                raise ValueError(f"tokenizer folder {path.parent} holds no tokenizer.json")
        if path.is_file():
            try:
                self._tok: Any = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path} is not a tokenizers tokenizer.json ({e})") from None
        else:
            try:
                self._tok = tokenizers.Tokenizer.from_pretrained(path_or_name)
            except Exception as e:  # offline, or no such hub repository
                raise ValueError(f"tokenizer '{path_or_name}' is no local file and could not be fetched from the "
                                 f"Hugging Face hub ({type(e).__name__}: {e}); give a tokenizer.json path") from None
        self.name = path_or_name
        self.vocab_size: int = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


Tokenizer = ByteTokenizer | HFTokenizer


def build_tokenizer(name: str) -> Tokenizer:
    """"byte" -> ByteTokenizer; anything else is a tokenizer.json path, a folder holding one, or a hub id."""
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("a tokenizer.json or hub tokenizer needs the 'tokenizers' package: pip install -e '.[hf]'") from e
    return tokenizers
