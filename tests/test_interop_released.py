"""Released BlackMamba checkpoints: a synthetic checkpoint in the exact released layout (config.json +
pytorch_model.bin holding {"model": state_dict}) loads into the platform's LM and computes what the released
code computes, written out independently below; every misfit is refused by name; the full-size layouts
match the presets' parameter counts."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from blocks.accounting import account
from experiments.build import build_model
from experiments.checkpoint import CheckpointError
from experiments.generation import generate, generate_by_reforward, load_model
from experiments.released import blackmamba_run_config, map_blackmamba_state
from experiments.utilization import moe_layers, record_routing

SPEC = ["r", "4", "r", "4", "r", "1"]  # Mamba, MoE (4 experts), Mamba, MoE, Mamba, dense MLP


def released_config(spec=SPEC, d=16, ffn=24, vocab=64, state=4, **extra) -> dict:
    return dict(num_layers=len(spec), hidden_size=d, state_size=state, conv_dimension=4, vocab_size=vocab,
                expansion_factor=2, mamba_moe_layers=spec, ffn_hidden_size=ffn, add_bias_linear=False, swiglu=True,
                max_sequence_length=2048, num_moe_experts=max([int(s[-1]) for s in spec if s[-1].isdigit()], default=0),
                **extra)


def released_state(config: dict, generator: torch.Generator | None = None, device=None) -> dict[str, torch.Tensor]:
    """Random weights under the released names and shapes (MambaModel of github.com/Zyphra/BlackMamba)."""
    g = generator or torch.Generator().manual_seed(0)
    D, F_, V, N, K = (config[k] for k in ("hidden_size", "ffn_hidden_size", "vocab_size", "state_size", "conv_dimension"))
    Ei, R = config["expansion_factor"] * D, math.ceil(D / 16)

    def rand(*shape, scale=0.3):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g) * scale

    sd = {"embedding.word_embeddings.weight": rand(V, D)}
    for i, s in enumerate(config["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        sd[p + "norm.weight"] = 1 + rand(D, scale=0.1)
        if s == "r":
            sd.update({p + "mixer.in_proj.weight": rand(2 * Ei, D), p + "mixer.conv1d.weight": rand(Ei, 1, K),
                       p + "mixer.conv1d.bias": rand(Ei), p + "mixer.x_proj.weight": rand(R + 2 * N, Ei),
                       p + "mixer.dt_proj.weight": rand(Ei, R), p + "mixer.dt_proj.bias": rand(Ei) - 2,
                       p + "mixer.A_log": rand(Ei, N, scale=0.5), p + "mixer.D": rand(Ei),
                       p + "mixer.out_proj.weight": rand(D, Ei)})
        elif s[0] == "1":
            sd.update({p + "mixer.linear_fc1.weight": rand(2 * F_, D), p + "mixer.linear_fc2.weight": rand(D, F_)})
        else:
            E = int(s[-1])
            sd.update({p + "mixer.router.weight": rand(E, D, scale=1.0), p + "mixer.router.bias": rand(E)})
            for e in range(E):
                sd[f"{p}mixer.local_experts.{e}.linear_fc1.weight"] = rand(2 * F_, D)
                sd[f"{p}mixer.local_experts.{e}.linear_fc2.weight"] = rand(D, F_)
    sd["decoder.final_layernorm.weight"] = 1 + rand(D, scale=0.1)
    sd["decoder.final_layernorm.bias"] = rand(D, scale=0.1)
    return sd


def write_released(folder, config=None, state=None, extra_objects=None):
    """A release folder: config.json and pytorch_model.bin = {"model": state_dict, ...}."""
    config = config or released_config()
    state = state if state is not None else released_state(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"model": state, **(extra_objects or {})}, folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------- the released computation, written out

def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mamba_ref(x, p):
    """Mamba-1 as the released MambaLayer computes it, with a plain sequential scan."""
    L, K = x.shape[1], p["conv1d.weight"].shape[-1]
    xs, z = (x @ p["in_proj.weight"].T).chunk(2, dim=-1)
    xs = F.silu(F.conv1d(xs.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=K - 1,
                         groups=xs.shape[-1])[..., :L]).transpose(1, 2)
    R, N = p["dt_proj.weight"].shape[1], p["A_log"].shape[1]
    dt, B, C = (xs @ p["x_proj.weight"].T).split([R, N, N], dim=-1)
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    A = -torch.exp(p["A_log"])
    h = torch.zeros(x.shape[0], xs.shape[-1], N)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * xs[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + p["D"] * xs[:, t])
    return (torch.stack(ys, 1) * F.silu(z)) @ p["out_proj.weight"].T


def glu_mlp(x, fc1, fc2, act):
    gate, up = (x @ fc1.T).chunk(2, dim=-1)
    return (act(gate) * up) @ fc2.T


def released_logits(sd, spec, ids, act=F.gelu):
    """Logits of the released MambaModel: embedding, blocks (residual added before each norm), final
    LayerNorm, tied head; SwitchMLP routes each token to argmax sigmoid(router) and scales by it."""
    hidden, residual = sd["embedding.word_embeddings.weight"][ids], None
    for i, s in enumerate(spec):
        p = {k.removeprefix(f"decoder.layers.{i}.mixer."): v for k, v in sd.items() if k.startswith(f"decoder.layers.{i}.mixer.")}
        residual = hidden if residual is None else hidden + residual
        x = rms_norm(residual, sd[f"decoder.layers.{i}.norm.weight"])
        if s == "r":
            hidden = mamba_ref(x, p)
        elif s[0] == "1":
            hidden = glu_mlp(x, p["linear_fc1.weight"], p["linear_fc2.weight"], act)
        else:
            prob, idx = torch.sigmoid(x @ p["router.weight"].T + p["router.bias"]).max(dim=-1)
            hidden = torch.zeros_like(x)
            for e in range(int(s[-1])):
                sel = idx == e
                hidden[sel] = glu_mlp(x[sel], p[f"local_experts.{e}.linear_fc1.weight"],
                                      p[f"local_experts.{e}.linear_fc2.weight"], act)
            hidden = hidden * prob[..., None]
    out = F.layer_norm(hidden + residual, (hidden.shape[-1],), sd["decoder.final_layernorm.weight"],
                       sd["decoder.final_layernorm.bias"], eps=1e-5)
    return out @ sd["embedding.word_embeddings.weight"].T


# ---------------------------------------------------------------- loading

@pytest.fixture
def release(tmp_path):
    config = released_config()
    state = released_state(config)
    return write_released(tmp_path / "BlackMamba-tiny", config, state), config, state


def test_released_checkpoint_computes_what_the_released_code_computes(release):
    folder, config, state = release
    model, info = load_model(folder)
    assert info["kind"] == "zyphra-blackmamba" and not model.training
    assert model.pattern == ["mamba", "moe", "mamba", "moe", "mamba", "mlp"]
    assert info["run_config"]["moe"]["activation"] == "geglu" and info["run_config"]["moe"]["num_experts"] == 4
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
    ref = released_logits(state, SPEC, ids)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    with record_routing(moe_layers(model)) as routing, torch.no_grad():
        model(ids)
    assert all(len(set(r.flatten().tolist())) > 1 for r in routing.values())  # several experts are checked


def test_released_checkpoint_generates_greedily_like_the_released_code(release):
    folder, config, state = release
    model, _ = load_model(folder)
    prompt = torch.tensor([[3, 14, 15, 9]])
    fast = generate(model, prompt, 6, temperature=0)
    assert torch.equal(fast, generate_by_reforward(model, prompt, 6))
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, released_logits(state, SPEC, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, seq[:, 4:])


def test_swiglu_follows_the_configs_label_instead(release):
    folder, config, state = release
    from experiments.released import load_blackmamba

    model, info = load_blackmamba(folder, activation="swiglu")
    model.eval()
    assert info["run_config"]["moe"]["activation"] == "swiglu"
    ids = torch.arange(12)[None] % 64
    with torch.no_grad():
        logits, _ = model(ids)
    torch.testing.assert_close(logits, released_logits(state, SPEC, ids, act=F.silu), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, released_logits(state, SPEC, ids), atol=1e-3)


def test_a_tokenizer_json_in_the_folder_is_the_models_tokenizer(release):
    folder, _, _ = release
    assert load_model(folder)[1]["run_config"]["data"]["tokenizer"] == "EleutherAI/gpt-neox-20b"
    (folder / "tokenizer.json").write_text("{}")
    assert load_model(folder)[1]["run_config"]["data"]["tokenizer"] == str((folder / "tokenizer.json").resolve())


# ---------------------------------------------------------------- refusals, by name

def _refusal(tmp_path, config=None, state=None, **kw):
    folder = write_released(tmp_path / "bad", config, state, **kw)
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    return str(e.value)


def test_missing_misshapen_and_unknown_tensors_are_named(tmp_path):
    config = released_config()
    state = released_state(config)
    del state["decoder.layers.3.mixer.local_experts.2.linear_fc2.weight"]
    state["decoder.layers.2.mixer.x_proj.weight"] = torch.zeros(5, 32)
    state["decoder.layers.1.mixer.local_experts.0.linear_fc1.bias"] = torch.zeros(48)
    msg = _refusal(tmp_path, config, state)
    assert "missing tensors: decoder.layers.3.mixer.local_experts.2.linear_fc2.weight" in msg
    assert "decoder.layers.2.mixer.x_proj.weight is 5x32, the config needs 9x32" in msg
    assert "no place in the model: decoder.layers.1.mixer.local_experts.0.linear_fc1.bias" in msg


def test_weights_of_another_size_are_refused(tmp_path):
    msg = _refusal(tmp_path, released_config(d=16), released_state(released_config(d=32)))
    assert "embedding.word_embeddings.weight is 64x32, the config needs 64x16" in msg


@pytest.mark.parametrize("spec, needle", [(["r", "r8"], "parallel"), (["r", "8", "r", "4"], "different expert counts"),
                                          (["r", "x"], "mamba_moe_layers[1] = 'x'")])
def test_layer_layouts_without_a_counterpart_are_refused(tmp_path, spec, needle):
    config = released_config(spec=spec)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mamba_moe_layers"):
        load_model(tmp_path / "bad")
    with pytest.raises(CheckpointError) as e:
        blackmamba_run_config(config)
    assert needle in str(e.value)


def test_pickled_objects_are_refused_naming_the_file(tmp_path):
    msg = _refusal(tmp_path, extra_objects={"args": argparse.Namespace(lr=1.0)})
    assert "pytorch_model.bin" in msg and "weights_only=True" in msg


def test_a_config_without_the_released_fields_is_refused(tmp_path):
    config = released_config()
    del config["ffn_hidden_size"], config["state_size"]
    assert "lacks state_size, ffn_hidden_size" in _refusal(tmp_path, config, released_state(released_config()))


# ---------------------------------------------------------------- the full-size releases

@pytest.mark.parametrize("d, layers, ffn, total, active", [(1152, 30, 3072, 1_458_462_072, 343_694_712),
                                                           (1472, 36, 3872, 2_783_213_584, 628_770_832)])
def test_full_size_release_layouts_map_onto_the_presets(d, layers, ffn, total, active):
    """The 1.5B / 2.8B layouts (on the meta device: shapes only) map key for key, with the released counts."""
    config = released_config(spec=["r", "8"] * (layers // 2), d=d, ffn=ffn, vocab=50304, state=16)
    state = released_state(config, device="meta")
    assert sum(t.numel() for t in state.values()) == total
    with torch.device("meta"):
        model = build_model(blackmamba_run_config(config))
    mapped = map_blackmamba_state(state, model, "release")
    assert set(mapped) == set(model.state_dict())
    acc = account(model, 2048)
    assert (acc.total_params, acc.active_params) == (total, active)


def test_hub_ids_are_fetched_through_huggingface_hub(release, monkeypatch):
    folder, _, _ = release
    hub = pytest.importorskip("huggingface_hub")
    calls = []
    monkeypatch.setattr(hub, "list_repo_files", lambda repo: ["README.md", "config.json", "pytorch_model.bin"])

    def snapshot_download(repo, allow_patterns):
        calls.append((repo, allow_patterns))
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    model, info = load_model("Zyphra/BlackMamba-tiny")
    assert info["kind"] == "zyphra-blackmamba"
    assert calls == [("Zyphra/BlackMamba-tiny", ["config.json", "tokenizer.json", "pytorch_model.bin"])]
