"""The data layer: sources, the by-file split, reproducible and resumable batches, clear errors."""
from __future__ import annotations

import pickle
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.data import (
    SEPARATOR,
    DataConfig,
    TokenDataModule,
    TrainBatches,
    load_source,
    split_by_name,
    stdlib_files,
    train_batch,
    val_starts,
    write_memmap,
)
from experiments.tokenizers import ByteTokenizer, build_tokenizer


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("blackmamba-cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, cache_root):
    """Every test caches into one session tmp dir, so the stdlib corpus is read from disk once per session."""
    monkeypatch.setenv("BLACKMAMBA_CACHE", str(cache_root))


@pytest.fixture(scope="session")
def stdlib_src(cache_root):
    return load_source(DataConfig(cache_dir=str(cache_root)))


def _text_folder(root, n_files=6, size=3000):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        sub = root / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i}.txt").write_text("".join(f"line {i}.{j}: héllo wörld\n" for j in range(size // 24)))
    return root


def _stream(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------ stdlib


def test_stdlib_corpus_loads(stdlib_src):
    assert stdlib_src.vocab_size == 256 and stdlib_src.bytes_per_token == 1.0
    assert len(stdlib_src.train) + len(stdlib_src.val) > 5_000_000
    assert len(stdlib_src.val) > 0 and stdlib_src.train.dtype == np.uint8


def test_stdlib_split_is_deterministic_and_by_file(stdlib_src):
    _, files = stdlib_files()
    names = [rel for rel, _ in files]
    is_val = split_by_name(names, 0.01)
    assert is_val == split_by_name(names, 0.01)
    assert dict(zip(names, is_val)) == dict(zip(names[::-1], split_by_name(names[::-1], 0.01)))  # order-free
    assert 0 < sum(is_val) < len(names)
    val_files = [p for (_, p), v in zip(files, is_val) if v]
    assert bytes(stdlib_src.val) == SEPARATOR.join(p.read_bytes() for p in val_files)
    train_sizes = [p.stat().st_size for (_, p), v in zip(files, is_val) if not v]
    assert len(stdlib_src.train) == sum(train_sizes) + len(SEPARATOR) * (len(train_sizes) - 1)


def test_stdlib_cache_is_reused(stdlib_src, cache_root):
    again = load_source(DataConfig(cache_dir=str(cache_root)))
    assert isinstance(again.train, np.memmap) and len(again.train) == len(stdlib_src.train)
    assert not list(cache_root.rglob("*.tmp"))


def test_split_by_name_puts_one_file_each_side():
    assert split_by_name(["a", "b"], 1e-9).count(True) == 1
    assert split_by_name(["a", "b"], 1 - 1e-9).count(True) == 1


# ------------------------------------------------------------------------------------------ batches


def test_batches_shapes_and_shift():
    dm = TokenDataModule(DataConfig(seq_len=32, batch_size=4, val_batches=3))
    for x, y in _stream(dm, 3) + list(dm.val_dataloader()):
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(dm.val_dataloader()) == 3
    assert "data=stdlib" in dm.describe() and "vocab 256" in dm.describe()


def test_same_seed_same_batches():
    a, b = (_stream(TokenDataModule(DataConfig(seq_len=16, batch_size=2)), 4) for _ in range(2))
    c = _stream(TokenDataModule(DataConfig(seq_len=16, batch_size=2, seed=7)), 4)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_resume_continues_the_stream():
    cfg = DataConfig(seq_len=16, batch_size=2)
    full = _stream(TokenDataModule(cfg), 10)
    dm = TokenDataModule(cfg)
    dm.set_start_batch(6)
    resumed = _stream(dm, 4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[6:], resumed))


def test_workers_give_the_same_stream():
    cfg = DataConfig(seq_len=16, batch_size=2)
    one = _stream(TokenDataModule(cfg), 5)
    two = _stream(TokenDataModule(DataConfig(seq_len=16, batch_size=2, num_workers=2)), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(one, two))


def test_memmap_tokens_pickle_by_name(stdlib_src):
    ds = TrainBatches(stdlib_src.train, 16, 2, seed=0)
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the file name, not 31 MB of tokens
    assert torch.equal(next(iter(pickle.loads(blob)))[0], next(iter(ds))[0])


class _Recorder(L.LightningModule):
    """A one-parameter model that records the first token column of every train batch it sees."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0][:, 0].clone())
        return self.w * batch[0].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, max_steps, accumulate, ckpt_path=None, callbacks=()):
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks), default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=TokenDataModule(DataConfig(seq_len=8, batch_size=2)), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_checkpoint_resume_equals_uninterrupted(tmp_path, accumulate):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = _fit(tmp_path, 6, accumulate, callbacks=[ckpt])
    resumed = _fit(tmp_path, 6, accumulate, ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert len(full) == 6 * accumulate and len(resumed) == 3 * accumulate
    assert all(torch.equal(a, b) for a, b in zip(full[3 * accumulate :], resumed))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 64), st.integers(1, 8), st.integers(1, 8))
def test_val_windows_fit_and_never_overlap(n_tokens, seq_len, batch_size, val_batches):
    if n_tokens < seq_len + 1:
        with pytest.raises(ValueError, match="no window"):
            val_starts(n_tokens, seq_len, batch_size, val_batches)
        return
    s = val_starts(n_tokens, seq_len, batch_size, val_batches)
    assert 1 <= len(s) <= val_batches * batch_size
    assert len(s) % batch_size == 0 or len(s) < batch_size
    assert s[0] == 0 and s[-1] + seq_len + 1 <= n_tokens and np.all(np.diff(s) >= seq_len + 1)


def test_train_batch_stays_in_bounds():
    tokens = np.arange(20, dtype=np.uint16)
    for i in range(50):
        x, y = train_batch(tokens, seq_len=19, batch_size=3, seed=0, index=i)
        assert torch.equal(x[0], torch.arange(19)) and torch.equal(y[0], torch.arange(1, 20))


# ------------------------------------------------------------------------------------------ text


def test_text_folder(tmp_path):
    root = _text_folder(tmp_path / "corpus")
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (root / ".hidden.txt").write_text("secret " * 100)
    dm = TokenDataModule(DataConfig(name="text", path=str(root), seq_len=32, batch_size=2))
    src = dm.load()
    assert src.vocab_size == 256 and src.bytes_per_token == 1.0
    assert "6 text files" in src.detail and "1 binary skipped" in src.detail
    assert b"secret" not in bytes(src.train) + bytes(src.val)
    x, y = _stream(dm, 1)[0]
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_text_single_file_tail_split(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 500)
    src = load_source(DataConfig(name="text", path=str(f), seq_len=64, val_fraction=0.1))
    assert len(src.val) == 500 and bytes(src.train) + bytes(src.val) == f.read_bytes()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "needs data.path"),
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "is empty"),
        (lambda p: _binaries(p / "bins"), "all 2 files look binary"),
        (lambda p: _text_folder(p / "tiny", n_files=2, size=48), "fewer than one window of seq_len\\+1=257"),
    ],
)
def test_text_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        load_source(DataConfig(name="text", path=None if path is None else str(path)))
    if path is not None:
        assert str(path) in str(e.value)


def _binaries(root):
    root.mkdir()
    (root / "a.bin").write_bytes(b"abc\0def")
    (root / "b.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    return root


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "txt"}, "unknown data source 'txt'. Valid: stdlib, text, memmap, hf; did you mean 'text'"),
        ({"seq_len": 0}, "data.seq_len must be positive"),
        ({"batch_size": -1}, "data.batch_size must be positive"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in \\(0, 1\\)"),
        ({"dtype": "int32"}, "data.dtype must be one of uint16, uint32"),
        ({"tokenizer": "gpt2"}, "data=stdlib is byte-level"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


# ------------------------------------------------------------------------------------------ memmap


@pytest.mark.parametrize("dtype, high", [("uint16", 2**16), ("uint32", 2**32)])
def test_memmap_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, high, 5000, dtype=np.int64), rng.integers(0, high, 700, dtype=np.int64)
    write_memmap(train, tmp_path / "train.bin", dtype)
    write_memmap(val, tmp_path / "val.bin", dtype)
    dm = TokenDataModule(DataConfig(name="memmap", path=str(tmp_path), dtype=dtype, seq_len=32, batch_size=4))
    src = dm.load()
    assert isinstance(src.train, np.memmap) and np.array_equal(src.train, train) and np.array_equal(src.val, val)
    assert src.vocab_size == max(train.max(), val.max()) + 1 and src.bytes_per_token is None
    assert "unknown bytes/token" in dm.describe()
    x, _ = _stream(dm, 1)[0]
    assert x.dtype == torch.int64 and int(x.max()) < high


def test_memmap_single_file_and_meta(tmp_path):
    tokens = np.arange(1000) % 50
    write_memmap(tokens, tmp_path / "all.bin", "uint16", vocab_size=50304, bytes_per_token=3.5)
    src = load_source(DataConfig(name="memmap", path=str(tmp_path / "all.bin"), seq_len=16, val_fraction=0.1))
    assert len(src.train) == 900 and np.array_equal(np.concatenate([src.train, src.val]), tokens)
    assert src.vocab_size == 50304 and src.bytes_per_token == 3.5


def test_memmap_errors(tmp_path):
    (tmp_path / "train.bin").write_bytes(b"\1\0\2")  # 3 bytes: not whole uint16 tokens
    (tmp_path / "val.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train\.bin' has 3 bytes, not a multiple of 2 \(uint16\)"):
        load_source(DataConfig(name="memmap", path=str(tmp_path)))
    (tmp_path / "train.bin").write_bytes(b"\1\0" * 1000)
    with pytest.raises(ValueError, match=r"val\.bin' is empty"):
        load_source(DataConfig(name="memmap", path=str(tmp_path)))
    with pytest.raises(ValueError, match="lacks val.bin"):
        (tmp_path / "val.bin").unlink()
        load_source(DataConfig(name="memmap", path=str(tmp_path)))
    with pytest.raises(ValueError, match="outside uint16"):
        write_memmap([0, 70000], tmp_path / "x.bin", "uint16")


# ------------------------------------------------------------------------------------------ tokenizers and hf


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.bytes_per_token == 1.0
    ids = tok.encode("héllo ∑")
    assert len(ids) == len("héllo ∑".encode()) and tok.decode(ids) == "héllo ∑"
    assert tok.decode(ids[:2]) == "h\ufffd"  # a window cut inside a character decodes, with a replacement


def test_missing_tokenizers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # what an environment without the package sees
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        build_tokenizer("gpt2")


def test_missing_datasets_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"data=hf needs the 'hf' extra: pip install -e '\.\[hf\]'"):
        load_source(DataConfig(name="hf", hf_dataset="roneneldan/TinyStories"))
