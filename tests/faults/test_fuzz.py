"""Input: run.py and sweep.py take any command line without a traceback. Hypothesis draws overrides (known and
random keys, values of every type, group picks, aliases, malformed tokens); each one either runs (a tiny model,
one step; a sweep: its session opened, checked and reported) or fails with one `error:` line that names what
is wrong.

The fixed tail of every command line keeps the cases small and inside tmp_path: it sets out_dir, storage and
the run's length after the drawn tokens, so they win. Keys that only point at places on disk (data.path,
tracking.uri, data.cache_dir) or start extra processes or compilers (data.num_workers, trainer.devices,
trainer.compile) are not drawn."""
import contextlib
import io
import os
import uuid

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from experiments.cli import main_train, one_line
from experiments.config import ALIASES, GROUPS, choices, compose
from experiments.train import flatten
from sweeps.cli import SWEEP_KEYS
from sweeps.cli import main as main_sweep

from ._util import finish, start

NOT_DRAWN = {"out_dir", "tracking.uri", "data.path", "data.cache_dir", "data.num_workers", "trainer.devices",
             "trainer.compile"}
SCHEMA_KEYS = sorted(k for k in flatten(OmegaConf.to_container(compose([]))) if k not in NOT_DRAWN)
SPECIAL = ["", "null", "???", "true", "false", "nan", "inf", "-inf", "1e30", "-1", "0", "[1,2]", "[mamba,moe]",
           "{a: 1}", "[1,2", "${oc.env:HOME}", "${oc.env:NO_SUCH_VARIABLE}", "${nope}", "${model.d_model}",
           "${oc.decode:'[1'}", "${foo:bar}", "'quoted'", "a=b", "!!python/object/apply:os.system ['true']",
           "\u00e9\u4e2d", "0x10", "1_000", " 3 "]
VALUES = st.one_of(
    st.integers(-3, 64).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
)
GROUP_PICKS = st.sampled_from(GROUPS).flatmap(
    lambda g: st.one_of(st.sampled_from(choices(g)), st.text(max_size=10)).map(lambda c: f"{g}={c}"))
TOKENS = st.one_of(
    st.tuples(st.sampled_from(SCHEMA_KEYS), VALUES).map("=".join),
    st.tuples(st.sampled_from(sorted(ALIASES)), VALUES).map("=".join),
    GROUP_PICKS,
    st.tuples(st.text(min_size=1, max_size=12), VALUES).map("=".join),
    st.tuples(st.sampled_from(["model", "moe", "trainer", "data", "optim"]), st.text(max_size=8), VALUES)
      .map(lambda t: f"{t[0]}.{t[1]}={t[2]}"),
    st.text(max_size=12),  # with or without '='
)
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tail(out_dir) -> list[str]:
    return ["model=tiny", "trainer=debug", "data.seq_len=32", "data.batch_size=4", "data.val_batches=1",
            "trainer.max_steps=1", "trainer.val_every=1", "trainer.progress_bar=false", f"out_dir={out_dir}"]


def names_the_problem(message: str, tokens: list[str]) -> bool:
    """The message quotes a drawn token, its key (or a dotted prefix of two parts, or its last part), the key an
    alias stands for, or its value."""
    for token in tokens:
        key, sep, value = token.partition("=")
        key = key.strip()
        parts = key.split(".")
        names = [f"'{token}'", key, ALIASES.get(key, key), ".".join(parts[:2]), parts[-1]]
        if sep and value.strip():
            names.append(value.strip())
        if any(n and one_line(n) in message for n in names):
            return True
    return False


def call(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


@FUZZ
@given(tokens=st.lists(TOKENS, min_size=1, max_size=3))
def test_any_run_command_line_runs_or_fails_with_one_line(tmp_path, store, tokens):
    if not (tmp_path / "mlflow.db").exists():  # one store for all examples
        store(tmp_path)
    rc, err = call(main_train, [*tokens, *tail(tmp_path)])
    assert "Traceback" not in err
    if rc == 0:
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc in (1, 2) and lines and lines[-1].startswith("error: "), err
    assert names_the_problem(lines[-1], tokens), f"{tokens} -> {lines[-1]}"


# n_trials is never a positive number: a drawn budget (budget.flops=1e30) could make a trial endless. The
# session is opened, checked and reported in full; test_concurrency runs real trials.
SWEEP_VALUES = {"n_trials": ["0", "-1", "abc", "", "1.5"], "n_jobs": ["1", "0", "-2", "x", ""],
                "timeout": ["1", "0", "-5", "abc", "3600", ""]}
SWEEP_TOKENS = st.one_of(
    st.sampled_from(sorted(SWEEP_VALUES)).flatmap(lambda k: st.sampled_from(SWEEP_VALUES[k]).map(lambda v: f"{k}={v}")),
    st.tuples(st.sampled_from([k for k in SWEEP_KEYS if k not in SWEEP_VALUES and k != "storage"]), VALUES).map("=".join),
    st.tuples(st.sampled_from(["sampler.", "pruner.", "budget."]), st.sampled_from(
        ["seed", "n_startup_trials", "tokens", "flops", "reports", "tokens_per_param", "x"]), VALUES)
      .map(lambda t: f"{t[0]}{t[1]}={t[2]}"),
    st.sampled_from(["sweep=" + n for n in ("lr", "experts", "routers", "expert", "nope.yaml", "")]),
    TOKENS,
)


@FUZZ
@given(tokens=st.lists(SWEEP_TOKENS, min_size=1, max_size=3))
def test_any_sweep_command_line_runs_or_fails_with_one_line(tmp_path, store, tokens):
    if not (tmp_path / "mlflow.db").exists():
        store(tmp_path)
    argv = ["sweep=lr", "n_trials=0", f"study=fuzz-{uuid.uuid4().hex[:8]}", *tokens, *tail(tmp_path), "trainer.max_steps=2", "budget.reports=1",
            f"storage=sqlite:///{tmp_path / 'optuna.db'}"]
    rc, err = call(main_sweep, argv)
    assert "Traceback" not in err
    if rc == 0:
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and lines and lines[-1].startswith("error: "), err
    assert names_the_problem(lines[-1], tokens), f"{tokens} -> {lines[-1]}"


NOT_UTF8 = [b"model.d_model=\xff\xfe", b"\xc3(=1"]  # bytes from a shell that are not UTF-8


def test_argv_that_is_not_utf8_fails_cleanly(tiny):
    rc, _, err = finish(start("run.py", NOT_UTF8))
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "'model.d_model" in err
    # as Python hands them to sweep.py (surrogate escapes), in this process
    rc, err = call(main_sweep, ["sweep=lr", *map(os.fsdecode, NOT_UTF8), *tiny()])
    assert rc == 2 and err.startswith("error: ") and "'model.d_model" in err and err.count("\n") == 1


def test_a_device_that_is_not_here_is_a_config_error(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main_train(tiny("trainer.accelerator=cuda")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trainer.accelerator=cuda") and err.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists(), "refused before any run was started"
