"""Writes: a write that fails half-way (a real EFBIG from RLIMIT_FSIZE, as on a full disk) keeps the previous
file; a truncated or damaged checkpoint is named at load, and resuming falls back to prev.ckpt."""
import hashlib
import multiprocessing
import resource

import pytest

from experiments.checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from experiments.cli import main_generate
from experiments.config import compose
from experiments.train import train

from ._util import assert_same_weights, client_for, run_script, state_dict

# a checkpoint of a few MB: larger than the MLflow store
STEPS = ["model.d_model=64", "model.ffn_dim=128", "trainer.max_steps=6", "trainer.val_every=2"]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def limit_file_size(n_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tiny, tmp_path, store, reference):
    whole = reference(tiny, *STEPS)
    out = store(tmp_path / "part")
    part = train(compose(tiny(*STEPS, "trainer.stop_at_step=2", f"out_dir={out}")))
    last = part.run_dir / "checkpoints" / "last.ckpt"
    before, size = sha(last), last.stat().st_size
    assert (out / "mlflow.db").stat().st_size * 2 < size, "the limit below must hit the checkpoint, not the store"
    # resume in a process that may not write a file past half a checkpoint: the next save dies in the middle
    rc, _, err = run_script("run.py", [f"out_dir={out}", f"resume={part.run_id}"], preexec_fn=limit_file_size(size // 2))
    assert rc == 2 and "Traceback" not in err, err
    error = err.strip().splitlines()[-1]
    assert error == f"error: could not write checkpoint {last}: File too large; the previous checkpoint is kept"
    assert sha(last) == before and load_checkpoint(last)["global_step"] == 2
    assert not list(last.parent.glob("*.tmp")), "the partial file is removed"
    assert client_for(out).get_run(part.run_id).info.status == "FAILED"
    resumed = train(compose([f"out_dir={out}", f"resume={part.run_id}"]))  # once there is room again
    assert_same_weights(state_dict(whole.run_dir / "checkpoints" / "last.ckpt"), state_dict(last))
    assert resumed.metrics["val/loss"] == whole.metrics["val/loss"]


def _write_past_the_limit(path, limit: int, errors) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        atomic_write_text(path, "x: " + "y" * 100 * limit)
    except OSError as e:
        errors.put(e.strerror)


def test_config_and_report_writes_that_fail_half_way_keep_the_old_file(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "model: {d_model: 64}\n")
    fork = multiprocessing.get_context("fork")  # the limit holds in the child process only
    errors = fork.Queue()
    child = fork.Process(target=_write_past_the_limit, args=(path, 4096, errors))
    child.start()
    child.join()
    assert child.exitcode == 0 and errors.get(timeout=10) == "File too large"
    assert path.read_text() == "model: {d_model: 64}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"], "no temporary file is left"


def test_a_truncated_or_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tiny, tmp_path, store,
                                                                                           reference, capsys):
    whole = reference(tiny, *STEPS)
    out = store(tmp_path / "part")
    part = train(compose(tiny(*STEPS, "trainer.stop_at_step=4", f"out_dir={out}")))
    ckpts = part.run_dir / "checkpoints"
    assert load_checkpoint(ckpts / "prev.ckpt")["global_step"] == 2 and load_checkpoint(ckpts / "last.ckpt")["global_step"] == 4

    data = bytearray((ckpts / "last.ckpt").read_bytes())
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated} is corrupt, truncated"):
        load_checkpoint(truncated)
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the tensors: torch.load alone would not notice
    (ckpts / "last.ckpt").write_bytes(data)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpts / 'last.ckpt'} is corrupt: its bytes do not match"):
        load_checkpoint(ckpts / "last.ckpt")
    capsys.readouterr()
    assert main_generate([f"ckpt={ckpts / 'last.ckpt'}"]) == 2
    assert f"{ckpts / 'last.ckpt'} is corrupt" in capsys.readouterr().err

    resumed = train(compose([f"out_dir={out}", f"resume={part.run_id}"]))
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpts / 'last.ckpt'} is corrupt" in err and "moved to last.ckpt.corrupt" in err
    assert f"resuming from {ckpts / 'prev.ckpt'} (step 2)" in err
    assert (ckpts / "last.ckpt.corrupt").is_file(), "kept for a look, not rotated into prev.ckpt"
    assert_same_weights(state_dict(whole.run_dir / "checkpoints" / "last.ckpt"), state_dict(ckpts / "last.ckpt"))
    assert resumed.metrics["val/loss"] == whole.metrics["val/loss"]
    assert load_checkpoint(ckpts / "prev.ckpt")["global_step"] == 4, "prev.ckpt is again one checkpoint older"
