"""A WordPiece vocabulary named by the user: a vocab file (one token a line) or a tokenizer directory.

Shared by the converters (decoding a txt_db's input_ids) and the checkpoint import (the export's
tokenizer): LightningDOT's files carry no tokenizer, so the user names one.
"""
from __future__ import annotations

from pathlib import Path


def vocab_source(path: str | Path) -> tuple[str, Path]:
    """("file", the vocab file) or ("dir", a tokenizer directory holding tokenizer.json or vocab.txt).

    Raises FileNotFoundError with a sentence naming the path."""
    p = Path(path)
    if p.is_file():
        return "file", p
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "vocab.txt").is_file():
            return "dir", p
        raise FileNotFoundError(f"{p}: a directory without tokenizer.json or vocab.txt")
    raise FileNotFoundError(f"{p}: no such vocab file or tokenizer directory")


def read_vocab(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def is_cased(tokens: list[str]) -> bool:
    """A cased vocabulary holds capitalised words (bert-base-cased: 'The'); an uncased one holds none
    outside its [SPECIAL] tokens. Decides BERT's lower-casing, which a bare vocab file does not say."""
    return any(t[:1].isupper() for t in tokens if not (t.startswith("[") and t.endswith("]")))
