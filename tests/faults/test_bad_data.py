"""Input: data folders that are empty, binary, not UTF-8, huge, or full of symlink loops, pipes and dangling
links are handled (run.py trains on what is usable) or refused with one line that names the path."""
import math
import os

import pytest

from experiments.cli import main_train
from experiments.data import _available_memory

from ._util import only_run

TEXT = "def f(x):\n    return x + 1\n" * 200


def folder(root, files=(), links=(), fifos=()):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    for name, target in links:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / name)
    for name in fifos:
        os.mkfifo(root / name)
    return root


def sparse_text_file(path, size: int):
    """`size` bytes that read as text at the start and cost no disk (a hole up to the last byte)."""
    with open(path, "wb") as f:
        f.write(TEXT.encode() * 2)  # more than the 8 KB that are probed for text
        f.seek(size - 1)
        f.write(b"\n")
    if path.stat().st_blocks * 512 > 64 * 2**20:
        pytest.skip("this filesystem has no sparse files")
    return path


def train_on(tiny, path, capsys):
    rc = main_train(tiny("data=text", f"path={path}", "trainer.max_steps=1", "trainer.val_every=1"))
    return rc, capsys.readouterr()


# four links that never reach a file, and a folder link back up (not followed: no endless walk)
LOOPS = [("self", "self"), ("a", "b"), ("b", "a"), ("dangling", "nowhere"), ("sub/up", "..")]


@pytest.mark.parametrize("make,match", [
    (lambda p: folder(p), "is empty (no files, hidden ones ignored)"),
    (lambda p: folder(p, [(".hidden.txt", TEXT)]), "is empty (no files, hidden ones ignored)"),
    (lambda p: folder(p, [("blob.bin", bytes(range(256)) * 64)]), "all 1 files look binary"),
    (lambda p: folder(p, [("latin1.txt", "caf\xe9 cr\xe8me\n".encode("latin-1") * 100)]), "not UTF-8"),
    (lambda p: folder(p, links=LOOPS, fifos=["pipe"]), "5 entries that are not regular files"),
    (lambda p: folder(p.parent / "elsewhere", links=[("loop", "loop")]) / "loop", "is a broken or looping symlink"),
    (lambda p: folder(p, [("tiny.txt", "x = 1\n")]), "too few for a train and a val window"),
])
def test_unusable_data_is_refused_in_one_line(tiny, tmp_path, capsys, make, match):
    path = make(tmp_path / "data")
    rc, out = train_on(tiny, path, capsys)
    assert rc == 2 and out.err.startswith("error: data=text") and out.err.count("\n") == 1, out.err
    assert match in out.err and str(path) in out.err
    assert not (tmp_path / "mlflow.db").exists(), "refused before any run was started"


def test_usable_files_among_loops_pipes_and_binaries_are_trained_on(tiny, tmp_path, store, capsys):
    store(tmp_path)
    path = folder(tmp_path / "data", [("a.py", TEXT), ("pkg/b.py", TEXT * 2), ("blob.bin", b"\0" * 4096),
                                      ("latin1.txt", "caf\xe9\n".encode("latin-1") * 50)], links=LOOPS, fifos=["pipe"])
    rc, out = train_on(tiny, path, capsys)
    assert rc == 0, out.err
    assert "2 text files" in out.out and "2 binary, 5 not regular files skipped" in out.out
    assert only_run(tmp_path).info.status == "FINISHED"


def test_a_huge_single_file_is_memory_mapped_not_read(tiny, tmp_path, store, capsys):
    store(tmp_path)
    size = max(64 * 2**30, 2 * (_available_memory() or 0))
    path = sparse_text_file(tmp_path / "huge.txt", size)
    rc, out = train_on(tiny, path, capsys)
    assert rc == 0, out.err
    assert f"train {size - math.ceil(size * 0.01):,} tokens" in out.out, "all of it, by its tail split"


def test_huge_files_in_a_folder_are_refused_before_they_are_read(tiny, tmp_path, capsys):
    free = _available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo: the free memory is unknown")
    path = folder(tmp_path / "data", [("small.txt", TEXT)])
    sparse_text_file(path / "huge.txt", max(64 * 2**30, 2 * free))
    rc, out = train_on(tiny, path, capsys)
    assert rc == 2 and "too much to read" in out.err and "data=memmap" in out.err, out.err
