"""Kill: SIGKILL at a random moment resumes to the same result; SIGTERM and Ctrl-C stop with a checkpoint and
end the MLflow run KILLED; a run left RUNNING by a dead process is recognised and closed."""
import random
import signal
import subprocess
import sys
import time

import pytest
from lightning.pytorch.callbacks import Callback

from experiments.checkpoint import load_checkpoint
from experiments.cli import main_train
from experiments.config import compose
from experiments.tracking import owner_alive
from experiments.train import Interrupted, train

from ._util import assert_same_weights, client_for, finish, only_run, start, state_dict, wait_for_file

# long enough to be killed mid-run: on a fast CPU 24 steps ended within the second after the first checkpoint
STEPS = 60
LONG = [f"trainer.max_steps={STEPS}", "trainer.val_every=3", "trainer.log_every=1"]


def test_sigkill_after_the_first_checkpoint_resumes_to_the_same_result(tiny, tmp_path, store, reference, capsys):
    victim = start("run.py", tiny(*LONG, f"out_dir={store(tmp_path / 'killed')}"))
    wait_for_file(victim, "runs/*/checkpoints/last.ckpt", tmp_path / "killed")
    time.sleep(random.uniform(0.0, 1.0))  # then anywhere: in a step, a validation or a checkpoint write
    victim.send_signal(signal.SIGKILL)
    rc, _, _ = finish(victim)
    if rc != -signal.SIGKILL:
        pytest.fail(f"the run ended (rc {rc}) before it was killed: give it more steps")
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    if client_for(tmp_path / "killed").get_run(run_dir.name).info.status == "FINISHED":
        pytest.fail("the run had finished and was killed on its way out: give it more steps")
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(load_checkpoint(p)["global_step"] >= 3 for p in ckpts), "every .ckpt file is whole"
    killed = client_for(tmp_path / "killed")
    run = killed.get_run(run_dir.name)
    assert run.info.status == "RUNNING" and owner_alive(run) is False, "left RUNNING by a process that is gone"

    whole = reference(tiny, *LONG)  # the uninterrupted run
    capsys.readouterr()
    assert main_train([f"out_dir={tmp_path / 'killed'}", f"resume={run_dir.name}"]) == 0
    captured = capsys.readouterr()
    assert f"run {run_dir.name} was left RUNNING by process {victim.pid}, which is gone" in captured.err
    assert f"run {run_dir.name} done at step {STEPS}" in captured.out
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "a half-written file of the killed process is removed"
    assert_same_weights(state_dict(whole.run_dir / "checkpoints" / "last.ckpt"), state_dict(run_dir / "checkpoints" / "last.ckpt"))
    resumed = killed.get_run(run_dir.name)
    assert resumed.info.status == "FINISHED" and resumed.data.metrics["val/loss"] == whole.metrics["val/loss"]
    assert resumed.data.tags["process.pid"] != str(victim.pid), "the resuming process took the run over"
    assert {m.step for m in killed.get_metric_history(run_dir.name, "val/loss")} == set(range(3, STEPS + 1, 3))


def test_sigterm_and_ctrl_c_save_a_checkpoint_end_killed_and_exit_cleanly(tiny, tmp_path, store):
    procs = {sig: start("run.py", tiny(*LONG, f"out_dir={store(tmp_path / sig.name)}"))
             for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, proc in procs.items():
        wait_for_file(proc, "runs/*/checkpoints/last.ckpt", tmp_path / sig.name)
        proc.send_signal(sig)
    for sig, proc in procs.items():
        rc, _, err = finish(proc)
        assert rc == 128 + sig, err
        assert "Traceback" not in err
        last_line = err.strip().splitlines()[-1]
        assert last_line.startswith(f"interrupted: {sig.name}: run ")
        assert "continue it with python run.py resume=" in last_line
        run = only_run(tmp_path / sig.name)
        assert run.info.status == "KILLED"
        ckpt = tmp_path / sig.name / "runs" / run.info.run_id / "checkpoints" / "last.ckpt"
        step = load_checkpoint(ckpt)["global_step"]
        assert f"checkpoint at step {step} in {ckpt}" in last_line and step < STEPS


class SignalAt(Callback):
    """Sends the process a real signal after training step `step`, or in the validation at that step."""

    def __init__(self, sig: signal.Signals, step: int, in_validation: bool = False):
        self.sig, self.step, self.in_validation = sig, step, in_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.in_validation and trainer.global_step == self.step:
            signal.raise_signal(self.sig)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.in_validation and trainer.global_step == self.step and batch_idx == 0:
            signal.raise_signal(self.sig)


SHORT = ["trainer.max_steps=8", "trainer.val_every=2"]


@pytest.mark.parametrize("sig,step,in_validation,saved_step", [
    (signal.SIGINT, 3, False, 3),  # between two validations: a checkpoint at step 3
    (signal.SIGTERM, 4, True, 2),  # inside the validation of step 4: step 2 stays the newest, 4 is redone
])
def test_a_signal_between_steps_or_in_a_validation_resumes_exactly(tiny, tmp_path, store, reference, sig, step,
                                                                 in_validation, saved_step):
    whole = reference(tiny, *SHORT)
    with pytest.raises(Interrupted) as stop:
        train(compose(tiny(*SHORT, f"out_dir={store(tmp_path / 'part')}")), callbacks=[SignalAt(sig, step, in_validation)])
    assert stop.value.signal_name == sig.name and stop.value.step == saved_step
    assert stop.value.exit_code == 128 + sig
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C handling is given back"
    run_id = stop.value.run_id
    assert client_for(tmp_path / "part").get_run(run_id).info.status == "KILLED"
    resumed = train(compose([f"out_dir={tmp_path / 'part'}", f"resume={run_id}"]))
    assert_same_weights(state_dict(whole.run_dir / "checkpoints" / "last.ckpt"),
                        state_dict(resumed.run_dir / "checkpoints" / "last.ckpt"))
    assert resumed.metrics["val/loss"] == whole.metrics["val/loss"]
    history = [m.step for m in client_for(tmp_path / "part").get_metric_history(run_id, "val/loss")]
    assert sorted(set(history)) == [2, 4, 6, 8], "every validation is logged, the interrupted one when redone"


def test_a_run_left_running_by_a_dead_process_is_closed_when_listed_and_a_live_one_is_not_resumed(tiny, tmp_path, store,
                                                                                                  capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    alive = subprocess.Popen(["sleep", "60"])
    store(tmp_path)
    try:
        client = client_for(tmp_path)
        run_id = train(compose(tiny("trainer.stop_at_step=2", "trainer.max_steps=4"))).run_id
        for pid, status in ((gone.stdout.strip(), "FAILED"), (str(alive.pid), "RUNNING")):
            client.set_tag(run_id, "process.pid", pid)  # as if `pid` were still training it
            client.set_tag(run_id, "process.start", "")
            client.update_run(run_id, "RUNNING")
            capsys.readouterr()
            assert main_train(tiny("--runs")) == 0
            (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(run_id)]
            assert status in line and client.get_run(run_id).info.status == status
            assert ("its process is gone" in line) == (status == "FAILED")
        assert f"process {gone.stdout.strip()}" in client.get_run(run_id).data.tags["end_reason"]
        assert main_train([f"out_dir={tmp_path}", f"resume={run_id}"]) == 2
        assert f"is being trained by process {alive.pid}" in capsys.readouterr().err
    finally:
        alive.kill()
        alive.wait()
