"""Token data: four sources, a reproducible and resumable train stream, fixed val batches, the DataModule.

Sources (DataConfig.name), each giving a 1-D train and val token array, `vocab_size` and `bytes_per_token`:
    stdlib  the running interpreter's standard-library *.py source, byte-level (vocab 256); ~31 MB, 1790 files
            on CPython 3.11. Split by file, cached as .npy in the cache dir (memory-mapped on later loads).
    text    a text file or a folder of text files (recursive), with the configured tokenizer (byte default).
    memmap  pre-tokenized little-endian uint16/uint32 ids: a folder with train.bin + val.bin, or one .bin.
    hf      a Hugging Face dataset + tokenizer (the optional 'hf' extra), split by document, cached like stdlib.

By-file split: a file (or HF document) goes to val when crc32 of its name, as a fraction of 2**32, is below
val_fraction; if that picks none, the lowest-scoring one goes to val (and if it picks all, the highest stays in
train). Each file's side depends only on its own name, so adding files never moves the others. A single file
or .bin is split by its tail: the last val_fraction of its tokens, but at least one window of seq_len+1.

bytes_per_token makes validation loss comparable across tokenizers: bits/byte = loss_nats / ln(2) / bytes_per_token.
It is 1.0 for byte-level data; for a subword tokenizer it is measured as UTF-8 bytes / tokens on the val text
(on the whole file for a single file). A memmap holds only ids, so its bytes_per_token is whatever its
meta.json records, and None when there is none: bits per byte is then unknown and must not be reported.

Train batch i is drawn from a generator seeded by (seed, rank, i): batch_size random windows of seq_len+1
tokens, x = w[:-1], y = w[1:]. Resuming after n batches restarts the stream at i = n and gives exactly the
batches an uninterrupted run would have seen; the DataModule's state_dict carries n through Lightning
checkpoints. Tokens become int64 tensors one batch at a time, never the whole corpus.

Shapes: B batch, L sequence length (seq_len).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import mmap
import os
import stat
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from experiments.tokenizers import HF_EXTRA_HINT, ByteTokenizer, Tokenizer, build_tokenizer

SEPARATOR = b"\n\n"  # between concatenated files / documents
CACHE_VERSION = 1  # bump when the cached arrays' layout or the split rule changes
MEMMAP_DTYPES = ("uint16", "uint32")
TEXT_PROBE_BYTES = 8192


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into batches (see the module docstring)."""

    name: str = "stdlib"  # stdlib | text | memmap | hf
    path: str | None = None  # text: file or folder; memmap: folder with train.bin/val.bin, or one .bin
    seq_len: int = 256
    batch_size: int = 16
    val_fraction: float = 0.01
    val_batches: int = 16  # how many fixed val batches (fewer if the val split is short)
    num_workers: int = 0
    seed: int = 1234
    dtype: str = "uint16"  # memmap token dtype: uint16 | uint32
    tokenizer: str = "byte"  # "byte", or a tokenizer.json path / folder / hub id (needs the 'hf' extra)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"
    cache_dir: str | None = None  # None: $BLACKMAMBA_CACHE, else ~/.cache/blackmamba-lab

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            close = difflib.get_close_matches(self.name, list(SOURCES), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown data source '{self.name}'. Valid: {', '.join(SOURCES)}{hint}")
        for key in ("seq_len", "batch_size", "val_batches"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key} must be positive, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in MEMMAP_DTYPES:
            raise ValueError(f"data.dtype must be one of {', '.join(MEMMAP_DTYPES)}, got '{self.dtype}'")
        if self.name == "stdlib" and self.tokenizer != "byte":
            raise ValueError("data=stdlib is byte-level: data.tokenizer must be 'byte' (use data=text for others)")


@dataclass(frozen=True)
class TokenSource:
    """A loaded corpus: 1-D token arrays (np.memmap or np.ndarray) and what a bits-per-byte report needs."""

    name: str
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    bytes_per_token: float | None  # None: unknown (a memmap without meta.json)
    detail: str  # where the tokens came from, for describe()


def load_source(cfg: DataConfig) -> TokenSource:
    """Build (or load from cache) the source that cfg.name picks."""
    return SOURCES[cfg.name](cfg)


def cache_dir(cfg: DataConfig) -> Path:
    """cfg.cache_dir, else $BLACKMAMBA_CACHE, else ~/.cache/blackmamba-lab."""
    root = cfg.cache_dir or os.environ.get("BLACKMAMBA_CACHE") or "~/.cache/blackmamba-lab"
    return Path(root).expanduser()


# ----------------------------------------------------------------------------------------- splitting


def split_by_name(names: Sequence[str], val_fraction: float) -> list[bool]:
    """is_val for each name: crc32(name) / 2**32 < val_fraction (stable across runs, unlike hash()).

    At least one name goes to each side when there are two or more.
    """
    scores = [zlib.crc32(n.encode("utf-8")) / 2**32 for n in names]
    is_val = [s < val_fraction for s in scores]
    if len(names) >= 2 and not any(is_val):
        is_val[scores.index(min(scores))] = True
    if len(names) >= 2 and all(is_val):
        is_val[scores.index(max(scores))] = False
    return is_val


def _tail_sizes(n: int, cfg: DataConfig, what: str) -> tuple[int, int]:
    """(train, val) token counts for a tail split of n tokens: val is the last val_fraction, >= one window."""
    n_val = max(math.ceil(n * cfg.val_fraction), cfg.seq_len + 1)
    if n - n_val < cfg.seq_len + 1:
        raise ValueError(
            f"{what}: {n:,} tokens are too few for a train and a val window of seq_len+1={cfg.seq_len + 1} tokens "
            f"each; add data or lower data.seq_len"
        )
    return n - n_val, n_val


def _check_windows(n_train: int, n_val: int, cfg: DataConfig, what: str) -> None:
    for split, n in (("train", n_train), ("val", n_val)):
        if n < cfg.seq_len + 1:
            raise ValueError(
                f"{what}: the {split} split has {n:,} tokens, fewer than one window of seq_len+1="
                f"{cfg.seq_len + 1}; add data, lower data.seq_len, or change data.val_fraction"
            )


# ----------------------------------------------------------------------------------------- tokenizing


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 2**8 else np.uint16 if vocab_size <= 2**16 else np.uint32)


def _tokenize_docs(docs: Sequence[bytes], tok: Tokenizer) -> tuple[np.ndarray, int]:
    """Concatenate documents (SEPARATOR between) into one token array; also return its UTF-8 byte count."""
    if isinstance(tok, ByteTokenizer):  # raw bytes are the tokens: no decode, invalid UTF-8 kept as is
        joined = SEPARATOR.join(docs)
        return np.frombuffer(joined, dtype=np.uint8), len(joined)
    sep_ids = tok.encode(SEPARATOR.decode())
    ids: list[int] = []
    n_bytes = 0
    for i, doc in enumerate(docs):
        text = doc.decode("utf-8", errors="replace")
        ids.extend(([] if i == 0 else sep_ids) + tok.encode(text))
        n_bytes += len(text.encode("utf-8")) + (0 if i == 0 else len(SEPARATOR))
    return np.asarray(ids, dtype=_token_dtype(tok.vocab_size)), n_bytes


def _docs_source(
    name: str, names: Sequence[str], docs: Sequence[bytes], tok: Tokenizer, cfg: DataConfig, detail: str
) -> TokenSource:
    """Split documents by name, tokenize each side, measure bytes_per_token on val."""
    is_val = split_by_name(names, cfg.val_fraction)
    train, _ = _tokenize_docs([d for d, v in zip(docs, is_val) if not v], tok)
    val, val_bytes = _tokenize_docs([d for d, v in zip(docs, is_val) if v], tok)
    bpt = tok.bytes_per_token or val_bytes / max(len(val), 1)
    n_val_docs = sum(is_val)
    detail = f"{detail}; {len(docs) - n_val_docs} train / {n_val_docs} val"
    return TokenSource(name, train, val, tok.vocab_size, bpt, detail)


# ----------------------------------------------------------------------------------------- files and cache


def _walk_files(root: Path, skip_dir: Callable[[str], bool]) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every entry under root that is not a folder, sorted. Symlinked folders
    are not followed, so a symlink loop cannot make the walk endless; a link to a file is listed (and may be
    broken or loop: see _regular)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d) and not (Path(dirpath) / d).is_symlink()]
        for f in filenames:
            p = Path(dirpath) / f
            out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _regular(path: Path) -> bool:
    """A regular file once symlinks are followed: not a broken or looping link, a FIFO, a socket or a device
    (opening a FIFO would wait for a writer forever)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:  # ENOENT for a broken link, ELOOP for a loop
        return False


def _is_text(path: Path) -> bool:
    """No NUL byte and valid UTF-8 in the first 8 KB (a character cut at the 8 KB edge is allowed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(TEXT_PROBE_BYTES)
    except OSError as e:
        raise ValueError(f"data=text: cannot read '{path}': {e.strerror or e}") from None
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # only a multi-byte character cut by the probe's edge is forgiven
        return len(head) == TEXT_PROBE_BYTES and e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write to a temp file beside `path`, then rename: readers in other processes never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(folder: Path, name: str, build: Callable[[], TokenSource]) -> TokenSource:
    """Load train.npy / val.npy / meta.json from `folder` (memory-mapped), or build and store them.

    meta.json is written last, so its presence means both arrays are complete; concurrent builders
    write identical files and the last rename wins.
    """
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        src = build()
        for split in ("train", "val"):
            _atomic_write(folder / f"{split}.npy", lambda f, a=getattr(src, split): np.save(f, a))
        meta = {"vocab_size": src.vocab_size, "bytes_per_token": src.bytes_per_token, "detail": src.detail}
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    meta = json.loads(meta_path.read_text())
    train, val = (np.load(folder / f"{s}.npy", mmap_mode="r") for s in ("train", "val"))
    return TokenSource(name, train, val, meta["vocab_size"], meta["bytes_per_token"], meta["detail"])


# ----------------------------------------------------------------------------------------- sources


def stdlib_files() -> tuple[Path, list[tuple[str, Path]]]:
    """The stdlib root and its *.py files (relative path, path), sorted, without site-/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk_files(root, lambda d: d in ("site-packages", "dist-packages", "__pycache__"))
    return root, [(rel, p) for rel, p in files if rel.endswith(".py")]


def _stdlib_source(cfg: DataConfig) -> TokenSource:
    root, files = stdlib_files()
    key = hashlib.sha1(f"v{CACHE_VERSION} {cfg.val_fraction!r} {SEPARATOR!r}\n".encode())
    for rel, p in files:
        key.update(f"{rel}\0{p.stat().st_size}\n".encode())
    version = f"{sys.implementation.name}{'.'.join(map(str, sys.version_info[:3]))}"
    folder = cache_dir(cfg) / "stdlib" / f"{version}-{key.hexdigest()[:16]}"

    def build() -> TokenSource:
        docs = [p.read_bytes() for _, p in files]
        detail = f"{len(files)} *.py files ({sum(map(len, docs)):,} bytes) of {version} under {root}"
        return _docs_source("stdlib", [rel for rel, _ in files], docs, ByteTokenizer(), cfg, detail)

    src = _cached(folder, "stdlib", build)
    _check_windows(len(src.train), len(src.val), cfg, "data=stdlib")
    return src


def _text_source(cfg: DataConfig) -> TokenSource:
    if cfg.path is None:
        raise ValueError("data=text needs data.path: a text file or a folder of text files")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        what = "is a broken or looping symlink" if root.is_symlink() else "does not exist"
        raise ValueError(f"data=text: path '{root}' {what}")
    tok = build_tokenizer(cfg.tokenizer)
    if root.is_file():
        if not _regular(root) or not _is_text(root):
            raise ValueError(f"data=text: '{root}' is not a text file (NUL bytes or not UTF-8 in its first 8 KB)")
        return _single_text(root, tok, cfg)
    if not root.is_dir():
        raise ValueError(f"data=text: '{root}' is neither a file nor a folder")
    entries = _walk_files(root, lambda d: d.startswith("."))
    entries = [(rel, p) for rel, p in entries if not Path(rel).name.startswith(".")]
    files = [(rel, p) for rel, p in entries if _regular(p)]
    others = len(entries) - len(files)  # broken or looping links, FIFOs, sockets, devices
    if not files:
        extra = f"; {others} entries that are not regular files (broken or looping links, pipes)" if others else ""
        raise ValueError(f"data=text: folder '{root}' is empty (no files, hidden ones ignored{extra})")
    texts = [(rel, p) for rel, p in files if _is_text(p)]
    if not texts:
        raise ValueError(
            f"data=text: no text file under '{root}': all {len(files)} files look binary "
            f"(NUL bytes or not UTF-8 in the first 8 KB)"
        )
    if len(texts) == 1:
        return _single_text(texts[0][1], tok, cfg)
    total, free = sum(p.stat().st_size for _, p in texts), _available_memory()
    if free is not None and 2 * total > free:  # the files are read, then joined
        raise ValueError(
            f"data=text: the {len(texts)} text files under '{root}' hold {total / 2**30:.1f} GiB, too much to read "
            f"into the {free / 2**30:.1f} GiB of free memory; give one file (it is memory-mapped), or tokenize "
            "them once with experiments.data.write_memmap and use data=memmap"
        )
    docs = [p.read_bytes() for _, p in texts]
    skipped = f"{len(files) - len(texts)} binary" + (f", {others} not regular files" if others else "")
    detail = f"{len(texts)} text files under {root} ({skipped} skipped)"
    src = _docs_source("text", [rel for rel, _ in texts], docs, tok, cfg, detail)
    _check_windows(len(src.train), len(src.val), cfg, f"data=text: '{root}'")
    return src


def _single_text(path: Path, tok: Tokenizer, cfg: DataConfig) -> TokenSource:
    """One text file, split by its tail; bytes_per_token measured on the whole file. Byte-level tokens are the
    file's bytes, memory-mapped, so a file of any size costs no memory; other tokenizers read it whole."""
    if isinstance(tok, ByteTokenizer):
        n_train, n_val = _tail_sizes(path.stat().st_size, cfg, f"data=text: '{path}'")
        train, val = _open_bin(path, np.dtype(np.uint8), 0, n_train), _open_bin(path, np.dtype(np.uint8), n_train, n_val)
        return TokenSource("text", train, val, tok.vocab_size, 1.0, f"1 file {path}, tail split")
    tokens, n_bytes = _tokenize_docs([path.read_bytes()], tok)
    n_train, _ = _tail_sizes(len(tokens), cfg, f"data=text: '{path}'")
    bpt = tok.bytes_per_token or n_bytes / len(tokens)
    return TokenSource("text", tokens[:n_train], tokens[n_train:], tok.vocab_size, bpt, f"1 file {path}, tail split")


def _open_bin(path: Path, dtype: np.dtype, offset_tokens: int, n_tokens: int) -> np.memmap:
    return np.memmap(path, dtype=dtype, mode="r", offset=offset_tokens * dtype.itemsize, shape=(n_tokens,))


def _bin_tokens(path: Path, dtype: np.dtype) -> int:
    """Number of tokens in a .bin file; a clear error if it is empty or not a whole number of tokens."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"data=memmap: '{path}' is empty")
    if size % dtype.itemsize:
        raise ValueError(
            f"data=memmap: '{path}' has {size:,} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): "
            f"truncated, or written with another data.dtype"
        )
    return size // dtype.itemsize


def _memmap_source(cfg: DataConfig) -> TokenSource:
    if cfg.path is None:
        raise ValueError("data=memmap needs data.path: a folder with train.bin and val.bin, or one .bin file")
    path = Path(cfg.path).expanduser()
    dtype = np.dtype(cfg.dtype).newbyteorder("<")
    if path.is_dir():
        missing = [f for f in ("train.bin", "val.bin") if not (path / f).is_file()]
        if missing:
            raise ValueError(f"data=memmap: folder '{path}' lacks {' and '.join(missing)}")
        train, val = (_open_bin(path / f, dtype, 0, _bin_tokens(path / f, dtype)) for f in ("train.bin", "val.bin"))
        _check_windows(len(train), len(val), cfg, f"data=memmap: '{path}'")
        meta_path, detail = path / "meta.json", f"train.bin + val.bin in {path}"
    elif path.is_file():
        n_train, n_val = _tail_sizes(_bin_tokens(path, dtype), cfg, f"data=memmap: '{path}'")
        train, val = _open_bin(path, dtype, 0, n_train), _open_bin(path, dtype, n_train, n_val)
        meta_path, detail = path.parent / "meta.json", f"{path}, tail split"
    else:
        raise ValueError(f"data=memmap: path '{path}' does not exist")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    # Without meta.json the vocab is inferred by scanning every token once.
    vocab_size = int(meta.get("vocab_size") or max(int(train.max()), int(val.max())) + 1)
    return TokenSource("memmap", train, val, vocab_size, meta.get("bytes_per_token"), f"{detail}, {cfg.dtype}")


def write_memmap(
    tokens: np.ndarray | Sequence[int],
    path: str | os.PathLike,
    dtype: str = "uint16",
    *,
    vocab_size: int | None = None,
    bytes_per_token: float | None = None,
) -> Path:
    """Write token ids as raw little-endian `dtype` to `path` (atomically); readable by data=memmap.

    With vocab_size or bytes_per_token, also (over)write meta.json beside the file.
    """
    if dtype not in MEMMAP_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(MEMMAP_DTYPES)}, got '{dtype}'")
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    out_dtype = np.dtype(dtype).newbyteorder("<")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(out_dtype).max):
        raise ValueError(f"token ids span [{ids.min()}, {ids.max()}], outside {dtype}")
    path = Path(path)
    _atomic_write(path, lambda f: f.write(ids.astype(out_dtype).tobytes()))
    meta = {k: v for k, v in (("vocab_size", vocab_size), ("bytes_per_token", bytes_per_token)) if v is not None}
    if meta:
        _atomic_write(path.parent / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
    return path


def _hf_source(cfg: DataConfig) -> TokenSource:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{HF_EXTRA_HINT} (the 'datasets' package is not installed)") from e
    if not cfg.hf_dataset:
        raise ValueError("data=hf needs data.hf_dataset (a Hugging Face dataset id)")
    tok = build_tokenizer(cfg.tokenizer)
    what = [cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.hf_text_field, cfg.tokenizer, cfg.val_fraction]
    what.append(CACHE_VERSION)
    folder = cache_dir(cfg) / "hf" / hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]

    def build() -> TokenSource:
        hf_cache = str(cache_dir(cfg) / "hf")
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, cache_dir=hf_cache)
        docs = [t.encode("utf-8") for t in ds[cfg.hf_text_field]]
        where = f"{cfg.hf_dataset}/{cfg.hf_config or ''}:{cfg.hf_split}[{cfg.hf_text_field}]"
        detail = f"{where}, {len(docs)} docs, tokenizer {cfg.tokenizer}"
        return _docs_source("hf", [str(i) for i in range(len(docs))], docs, tok, cfg, detail)

    src = _cached(folder, "hf", build)
    _check_windows(len(src.train), len(src.val), cfg, f"data=hf: {cfg.hf_dataset}")
    return src


SOURCES: dict[str, Callable[[DataConfig], TokenSource]] = {
    "stdlib": _stdlib_source,
    "text": _text_source,
    "memmap": _memmap_source,
    "hf": _hf_source,
}


# ----------------------------------------------------------------------------------------- batches


def _windows(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """x_BL, y_BL (int64) from windows of seq_len+1 tokens at starts_B; only these tokens are copied."""
    w_BL1 = np.asarray(tokens[starts_B[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(w_BL1[:, :-1].copy()), torch.from_numpy(w_BL1[:, 1:].copy())


def train_batch(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, index: int, rank: int = 0
) -> tuple[Tensor, Tensor]:
    """Batch `index` of the training stream: random windows from a generator seeded by (seed, rank, index)."""
    rng = np.random.default_rng([seed, rank, index])
    starts_B = rng.integers(0, len(tokens) - seq_len, size=batch_size)  # last start: len - (seq_len+1)
    return _windows(tokens, starts_B, seq_len)


def val_starts(n_tokens: int, seq_len: int, batch_size: int, val_batches: int) -> np.ndarray:
    """Start offsets of the fixed val windows: evenly spread, never overlapping, whole batches when possible.

    val_batches * batch_size windows, clipped to the n_tokens // (seq_len+1) that fit without overlap
    (then rounded down to whole batches, or one partial batch if not even one full batch fits).
    """
    n_fit = n_tokens // (seq_len + 1)
    if n_fit == 0:
        raise ValueError(f"{n_tokens} val tokens hold no window of seq_len+1={seq_len + 1}")
    n_win = min(val_batches * batch_size, n_fit)
    if n_win >= batch_size:
        n_win -= n_win % batch_size
    span = n_tokens - (seq_len + 1)  # the last window starts here
    return np.arange(n_win, dtype=np.int64) * span // max(n_win - 1, 1)


class _TokenWindows:
    """Holds a token array; pickles a memory-mapped one (for spawned workers) by file name, not by content."""

    tokens: np.ndarray

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap):  # a whole memmap, not a slice of one
            state["tokens"] = ("memmap", t.filename, t.dtype.str, t.offset, t.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            _, filename, dtype, offset, shape = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)


class TrainBatches(_TokenWindows, IterableDataset):
    """The endless train stream from batch `start_batch` on; each item is a whole batch (x_BL, y_BL).

    With several workers, worker w yields batches start+w, start+w+W, ...; DataLoader returns them in
    order, so the stream is the same for any num_workers. Each rank of a distributed run has its own stream.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, start_batch: int = 0) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.start_batch = seed, start_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        i = self.start_batch + worker
        while True:
            yield train_batch(self.tokens, self.seq_len, self.batch_size, self.seed, i, rank)
            i += n_workers


class ValBatches(_TokenWindows, Dataset):
    """The fixed val batches: item j is (x_BL, y_BL) for windows j*B .. (j+1)*B of val_starts()."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, val_batches: int) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.starts = val_starts(len(tokens), seq_len, batch_size, val_batches)

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor]:
        if not 0 <= j < len(self):
            raise IndexError(j)
        return _windows(self.tokens, self.starts[j * self.batch_size : (j + 1) * self.batch_size], self.seq_len)


class TokenDataModule(L.LightningDataModule):
    """Train stream and fixed val batches for one DataConfig, resumable through Lightning checkpoints.

    The train loader is endless: the trainer's max_steps ends training (and val_check_interval must be a
    step count). Its state_dict records how many train batches have been consumed; on resume, Lightning
    restores it before asking for the train loader, which then continues the same stream. set_start_batch
    does the same by hand.
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.start_batch = 0
        self._source: TokenSource | None = None
        self._processed_at_start: int | None = None  # the trainer's batch count when the train loader was made

    def load(self) -> TokenSource:
        """The source, built (and cached on disk where the source caches) on first use."""
        if self._source is None:
            self._source = load_source(self.cfg)
        return self._source

    def prepare_data(self) -> None:
        self.load()  # Lightning calls this on one process per node: the cache is written there first

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def vocab_size(self) -> int:
        return self.load().vocab_size

    @property
    def bytes_per_token(self) -> float | None:
        return self.load().bytes_per_token

    def set_start_batch(self, i: int) -> None:
        """Start the next train loader at batch i (i batches already consumed)."""
        if i < 0:
            raise ValueError(f"start batch must be >= 0, got {i}")
        self.start_batch = i

    def _trainer_processed(self) -> int | None:
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def batches_consumed(self) -> int:
        """Train batches consumed so far: start_batch plus what the trainer has processed from this loader."""
        now = self._trainer_processed()
        if now is None or self._processed_at_start is None:
            return self.start_batch
        return self.start_batch + now - self._processed_at_start

    def state_dict(self) -> dict[str, Any]:
        return {"batches_consumed": self.batches_consumed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_start_batch(int(state_dict["batches_consumed"]))
        self._processed_at_start = None

    def train_dataloader(self) -> DataLoader:
        if self._processed_at_start is not None:  # a second loader in one run continues the stream
            self.start_batch = self.batches_consumed()
        self._processed_at_start = self._trainer_processed()
        c = self.cfg
        ds = TrainBatches(self.load().train, c.seq_len, c.batch_size, c.seed, self.start_batch)
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader:
        c = self.cfg
        return self._loader(ValBatches(self.load().val, c.seq_len, c.batch_size, c.val_batches))

    def _loader(self, ds: Dataset) -> DataLoader:
        n = self.cfg.num_workers
        pin = torch.cuda.is_available()
        return DataLoader(ds, batch_size=None, num_workers=n, persistent_workers=n > 0, pin_memory=pin)

    def describe(self) -> str:
        """One line: source, train/val tokens, val batches, vocab, bytes per token."""
        s, c = self.load(), self.cfg
        n_val_batches = len(ValBatches(s.val, c.seq_len, c.batch_size, c.val_batches))
        bpt = "unknown" if s.bytes_per_token is None else f"{s.bytes_per_token:.3f}"
        return (
            f"data={s.name} ({s.detail}): train {len(s.train):,} tokens, val {len(s.val):,} tokens "
            f"({n_val_batches} batches of {c.batch_size}x{c.seq_len}), vocab {s.vocab_size}, {bpt} bytes/token"
        )
