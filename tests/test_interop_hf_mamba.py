"""Hugging Face Mamba checkpoints: transformers' MambaForCausalLM and the loaded platform model, with the same
random weights, give the same logits (fp32) and the same greedy generations on the CPU."""
import json

import pytest
import torch

from experiments.checkpoint import CheckpointError
from experiments.generation import generate, load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def hf_model(**overrides):
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, state_size=8, expand=2, conv_kernel=4,
               time_step_rank=4, layer_norm_epsilon=1e-5, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # move every weight off its init so that each one matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("overrides", [{}, dict(use_bias=True, use_conv_bias=False, tie_word_embeddings=False)])
def test_same_logits_as_transformers(tmp_path, overrides):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model, info = load_model(tmp_path)
    assert info["kind"] == "hf-mamba" and model.pattern == ["mamba"] * 3
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        logits, _ = model(ids)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_same_greedy_generation_as_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    prompt = torch.tensor([[5, 17, 42, 8, 66]])
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 5:]
    assert ref.shape == (1, 16)
    assert torch.equal(generate(model, prompt, 16, temperature=0), ref)


def test_pytorch_model_bin_with_the_older_embedding_name(tmp_path):
    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    state = {k.replace("embeddings.", "embedding."): v for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = load_model(tmp_path / "config.json")
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_sharded_safetensors(tmp_path):
    from safetensors.torch import save_file

    hf = hf_model()
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_model(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_mismatching_config_is_refused_by_name(tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "state_size": 16}))
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mixer.A_log is 64x8, the config needs 64x16"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        load_model(tmp_path)
