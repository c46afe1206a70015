"""Optuna studies over run.py configs (python sweep.py sweep=<name>), tracked in MLflow.

    spec.py       a sweep file (conf/sweep/<name>.yaml) and the command line's sweep keys
    space.py      the search-space language, its start-up checks, trial -> run.py overrides
    budget.py     fixed tokens / fixed FLOPs / tokens per parameter -> max_steps per trial
    samplers.py   samplers and pruners by name
    study.py      storage, study creation and resumption, the MLflow parent run
    objective.py  one trial: experiments.train.train with a pruning callback, as a nested MLflow run
    reporting.py  best trials with their run.py commands, best config YAML, plots
    cli.py        sweep.py's command line, worker processes
"""
