"""End to end on the CPU: train, track, checkpoint, resume, generate, and fail fast on bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.cli import main_generate, main_train
from experiments.config import compose
from experiments.generation import generate, generate_by_reforward, load_model
from experiments.train import train

ROOT = Path(__file__).resolve().parent.parent


def client_for(out_dir) -> MlflowClient:
    return MlflowClient(f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}")


def test_run_is_tracked_in_mlflow_with_checkpoints(tiny, tmp_path):
    result = train(compose(tiny("trainer.max_steps=6", "trainer.val_every=3", "trainer.log_every=1")))
    run = client_for(tmp_path).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["mixer.name"] == "mamba" and run.data.params["moe.num_experts"] == "4"
    assert int(run.data.params["params_total"]) > int(run.data.params["params_active"])
    for key in ("train/loss", "val/loss", "val/bpb", "train/lr", "train/tokens_per_s", "train/mfu", "train/grad_norm"):
        assert key in run.data.metrics, key
    assert any(k.startswith("moe/layer1/") for k in run.data.metrics)
    assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["family"] == "blackmamba"
    assert run.data.metrics["train/tokens_total"] == 6 * 4 * 32
    ckpt_dir = Path(run.data.tags["checkpoint_dir"])
    assert (ckpt_dir / "last.ckpt").is_file() and (ckpt_dir / "best.ckpt").is_file()
    artifacts = [a.path for a in client_for(tmp_path).list_artifacts(result.run_id)]
    assert "config.yaml" in artifacts
    assert not list(ckpt_dir.glob("*.tmp")), "atomic writes leave no temporary files"


@pytest.mark.parametrize(
    "argv",
    [
        ["mixer=mamba", "router=sinkhorn", "experts=8"],
        ["mixer=attention"],
        ["mixer=mamba2", "mixer.headdim=16", "mixer.d_state=16"],
        ["router=top1"],
        ["router=expert_choice"],
        ["experts=4", "top_k=2"],
    ],
)
def test_user_card_commands_run(tiny, argv):
    result = train(compose(tiny("trainer.max_steps=2", "trainer.val_every=2", *argv)))
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tiny, tmp_path):
    whole = train(compose(tiny("trainer.max_steps=8", "trainer.val_every=2", "out_dir=" + str(tmp_path / "a"))))
    part = train(compose(tiny("trainer.max_steps=8", "trainer.val_every=2", "trainer.stop_at_step=4", "out_dir=" + str(tmp_path / "b"))))
    assert torch.load(part.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # the resumed run takes its saved config; the command line only lifts the early stop
    resumed = train(compose(["out_dir=" + str(tmp_path / "b"), f"resume={part.run_id}", "trainer.stop_at_step=null"]))
    assert resumed.run_dir == part.run_dir
    assert resumed.run_id == part.run_id, "resume continues the same MLflow run"
    a, b = final_weights(whole.run_dir), final_weights(resumed.run_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed.metrics["val/loss"] == pytest.approx(whole.metrics["val/loss"], abs=0)
    history = client_for(tmp_path / "b").get_metric_history(part.run_id, "val/loss")
    assert [m.step for m in history] == [2, 4, 6, 8], "one metric history across the interruption"
    assert client_for(tmp_path / "b").get_run(part.run_id).info.status == "FINISHED"


def test_generation_is_recurrent_and_matches_reforward(tiny, tmp_path, capsys):
    result = train(compose(tiny("trainer.max_steps=4", "model.pattern=[mamba,moe,attention,moe]")))
    model, _ = load_model(result.run_dir / "checkpoints" / "best.ckpt")
    prompt = torch.tensor([list(b"def f(x): return "), list(b"import os, sys, r")])
    fast = generate(model, prompt, 24, temperature=0)
    slow = generate_by_reforward(model, prompt, 24)
    assert torch.equal(fast, slow)
    sampled = generate(model, prompt, 24, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 24)
    capsys.readouterr()
    assert main_generate([f"ckpt={result.run_dir / 'checkpoints' / 'best.ckpt'}", "prompt=def ", "max_tokens=16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and len(captured.out) > 4 and "tokens/s" in captured.err


def test_failed_run_ends_failed_not_running(tiny, tmp_path):
    with pytest.raises(FloatingPointError):
        train(compose(tiny("optim.lr=1e30", "optim.warmup_steps=1", "trainer.grad_clip=0", "trainer.max_steps=6")))
    runs = client_for(tmp_path).search_runs([client_for(tmp_path).get_experiment_by_name("blackmamba").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize(
    "make_argv,match",
    [
        (lambda p: ["data=text", f"path={p / 'empty'}"], "is empty"),
        (lambda p: ["data=text", f"path={p / 'binary'}"], "no text"),
        (lambda p: ["data=text", f"path={p / 'missing'}"], "does not exist"),
        (lambda p: ["resume=abc123"], "no checkpoint"),
        (lambda p: ["experts=2", "top_k=3"], "top_k"),
    ],
)
def test_bad_input_fails_fast_with_a_message(tiny, tmp_path, capsys, make_argv, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    assert main_train(tiny(*make_argv(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert match in err.lower() or match in err
    assert not (tmp_path / "mlflow.db").exists() or not list((tmp_path / "runs").glob("*")), "no run was started"


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path, capsys):
    assert main_generate([f"ckpt={tmp_path / 'nope.ckpt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip file")
    assert main_generate([f"ckpt={bad}"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and str(bad) in err


def test_resume_refuses_group_picks_and_unknown_runs(tiny, tmp_path):
    part = train(compose(tiny("trainer.stop_at_step=2")))
    with pytest.raises(ValueError, match="drop the group picks"):
        compose([f"out_dir={tmp_path}", "resume=last", "mixer=attention"])
    assert compose([f"out_dir={tmp_path}", "resume=true"]).resume == part.run_id
    with pytest.raises(ValueError, match=f"runs with checkpoints: {part.run_id}"):
        compose([f"out_dir={tmp_path}", "resume=nope"])


def test_run_py_runs_as_a_script(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "model=lstm"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "unknown model 'lstm'" in out.stderr and "Traceback" not in out.stderr
