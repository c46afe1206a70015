"""Any tokenizer.json (through the `tokenizers` library) for data and generation; byte-level is built in."""
import json

import pytest
import torch
from test_interop_released import released_config, write_released

from experiments.cli import main_generate
from experiments.data import DataConfig, load_source
from experiments.generation import generate, load_model
from experiments.tokenizers import HFTokenizer, build_tokenizer

tokenizers = pytest.importorskip("tokenizers")
CODE = ["def add(a, b):\n    return a + b\n", "import os, sys\nclass Point:\n    x: int = 0\n",
        "for i in range(10):\n    print(i)\n"]


def byte_level_bpe(path, vocab_size=300):
    """A small byte-level BPE tokenizer.json, built the way GPT-NeoX's is (ByteLevel pre-tokenizer and decoder)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CODE * 20, trainer)
    tok.save(str(path))
    return path


def test_a_tokenizer_json_round_trips_text(tmp_path):
    tok = build_tokenizer(str(byte_level_bpe(tmp_path / "tokenizer.json")))
    assert isinstance(tok, HFTokenizer) and 256 < tok.vocab_size <= 300
    text = "def sub(a, b):\n    return a - b  # ünïcode\n"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) and tok.decode(ids) == text
    assert build_tokenizer(str(tmp_path)).encode(text) == ids  # a folder holding tokenizer.json


def test_a_tokenizer_json_feeds_text_data(tmp_path):
    tok_path = byte_level_bpe(tmp_path / "tokenizer.json")
    (tmp_path / "corpus").mkdir()
    for i in range(8):
        (tmp_path / "corpus" / f"f{i}.py").write_text("\n".join(CODE) * 30)
    src = load_source(DataConfig(name="text", path=str(tmp_path / "corpus"), tokenizer=str(tok_path), seq_len=16))
    assert src.vocab_size == build_tokenizer(str(tok_path)).vocab_size and src.train.max() < src.vocab_size
    assert src.bytes_per_token > 1.5  # subword tokens carry several bytes each, measured on the val text


def test_bad_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a tokenizers tokenizer.json"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))


def test_generation_decodes_with_the_checkpoints_tokenizer_json(tmp_path, capsys):
    folder = write_released(tmp_path / "release", released_config(vocab=320))
    byte_level_bpe(folder / "tokenizer.json")
    model, info = load_model(folder)
    tok = build_tokenizer(info["run_config"]["data"]["tokenizer"])
    assert tok.vocab_size <= model.cfg.vocab_size
    capsys.readouterr()
    assert main_generate([f"ckpt={folder}", "prompt=def add", "max_tokens=12", "temperature=0"]) == 0
    out = capsys.readouterr().out
    prompt = torch.tensor([tok.encode("def add")])
    expected = tok.decode(generate(model, prompt, 12, temperature=0)[0].tolist())
    assert out.startswith("def add") and out.rstrip("\n") == "def add" + expected.rstrip("\n")
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 320
