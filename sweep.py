"""Run an Optuna study of training runs: python sweep.py sweep=experts n_trials=20  (see --help)."""
import sys

from sweeps.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
