"""Sample from a checkpoint: python generate.py ckpt=outputs/runs/<id>/checkpoints/best.ckpt prompt="def "

ckpt= also takes a safetensors export, a released BlackMamba or Hugging Face Mamba folder, or a hub id
(docs/released_models.md); the model's tokenizer is the one it was saved or released with.
"""
import sys

from experiments.cli import main_generate

if __name__ == "__main__":
    sys.exit(main_generate(sys.argv[1:]))
