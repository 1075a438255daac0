"""Text corpora from `../shared/data`, and packing token streams into fixed-length sequences.

The paper profiles on WikiText-2 "packed without padding at batch size 1": the whole text is tokenized as one
stream and cut into consecutive sequences of `seq_len` tokens, each starting a fresh context.
"""
import os
import re
from pathlib import Path

import numpy as np

from .errors import RadialError

SHARED = Path(os.environ.get("RADIAL_MIN_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"
WIKITEXT_VALID = SHARED / "wikitext-2" / "valid.txt"
KJV = SHARED / "kjv" / "kjv.txt"


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise RadialError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RadialError(f"{path}: not UTF-8 text ({e})") from None


def kjv_chapters(path=KJV) -> list[str]:
    """The King James Bible as one string per chapter: its "Book N" heading line, then one verse per line with
    the verse number dropped (numbers are references, not text). Chapters are separated by blank lines."""
    chapters = []
    for block in re.split(r"\n\s*\n", read_text(path).strip()):
        heading, *verses = block.strip().splitlines()
        verses = [v.split(" ", 1)[1] if re.match(r"^\d+ ", v) else v for v in verses]
        chapters.append("\n".join([heading, *verses]) + "\n")
    return chapters


def split_kjv(chapters: list[str], every: int = 20):
    """Hold out every `every`-th chapter (5% by default), spread across all books, for validation."""
    train = [c for i, c in enumerate(chapters) if i % every != every - 1]
    held = [c for i, c in enumerate(chapters) if i % every == every - 1]
    return train, held


def wikitext_fetch(split: str = "test") -> Path:
    """WikiText-2 from the Hub when `../shared/data` is not there (needs network, and pyarrow for parquet)."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download("Salesforce/wikitext", f"wikitext-2-v1/{split}-00000-of-00001.parquet", repo_type="dataset")
        import pyarrow.parquet as pq
    except ImportError:
        raise RadialError("reading WikiText-2 from the Hub needs pyarrow (pip install pyarrow); or pass --text FILE") from None
    except Exception as e:
        raise RadialError(f"WikiText-2 is not in {SHARED} and fetching it from the Hub failed ({type(e).__name__}); pass --text FILE") from None
    out = Path(path).with_suffix(".txt")
    out.write_text("".join(pq.read_table(path).column("text").to_pylist()), encoding="utf-8")
    return out


def default_text(split: str = "test") -> Path:
    path = SHARED / "wikitext-2" / f"{split}.txt"
    return path if path.is_file() else wikitext_fetch(split)


def pack(tokens: np.ndarray, seq_len: int, max_sequences: int | None = None) -> np.ndarray:
    """Cut a token stream into consecutive, non-overlapping rows of `seq_len`; the ragged tail is dropped."""
    if seq_len < 1:
        raise RadialError(f"--seq-len must be >= 1, got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise RadialError(f"--max-sequences must be >= 1, got {max_sequences}")
    n = len(tokens) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise RadialError(f"text has {len(tokens)} tokens, fewer than one sequence of {seq_len}")
    return np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
