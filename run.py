"""Train one model: python run.py mixer=mamba router=sinkhorn experts=8  (see --help)."""
import sys

from experiments.cli import main_train

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
