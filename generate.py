"""Sample from a checkpoint: python generate.py ckpt=outputs/runs/<id>/checkpoints/best.ckpt prompt="def " """
import sys

from experiments.cli import main_generate

if __name__ == "__main__":
    sys.exit(main_generate(sys.argv[1:]))
