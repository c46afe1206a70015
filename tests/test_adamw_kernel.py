"""The master-weights AdamW kernel (blocks/kernels/adamw.py) against its PyTorch twin and torch's AdamW, under
Triton's interpreter (fp16 weights stand in for bf16, which the interpreter cannot run)."""
import pytest
import torch

from blocks.kernels import force_triton
from blocks.kernels.adamw import master_adamw_torch_, master_adamw_triton_
from experiments.master_adamw import MasterAdamW

HP = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g)
    return dict(weight=master.to(dtype), grad=torch.randn(n, generator=g).to(dtype), master=master,
                exp_avg=0.1 * torch.randn(n, generator=g), exp_avg_sq=torch.rand(n, generator=g))


@pytest.mark.parametrize("dtype,n", [(torch.float16, 200), (torch.float16, 64), (torch.float32, 131)])
def test_the_kernel_equals_its_twin(dtype, n):
    for step in (1, 7):
        a, b = _state(n, dtype, seed=step), _state(n, dtype, seed=step)
        if dtype == torch.float32:  # an fp32 weight is its own master
            a["weight"], b["weight"] = a["master"], b["master"]
        master_adamw_triton_(**a, step=step, **HP)
        master_adamw_torch_(**b, step=step, **HP)
        for key in ("master", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
        assert torch.equal(a["weight"], a["master"].to(dtype)), "the weight is its master, rounded"
        assert not torch.equal(a["master"], _state(n, dtype, seed=step)["master"]), "it moved"


def test_the_twin_is_torchs_adamw():
    s = _state(50, torch.float32, seed=3)
    p = torch.nn.Parameter(s["master"].clone())
    opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    opt.state[p].update(step=torch.tensor(4.0), exp_avg=s["exp_avg"].clone(), exp_avg_sq=s["exp_avg_sq"].clone())
    p.grad = s["grad"].clone()
    opt.step()
    master_adamw_torch_(**s, step=5, **HP)
    torch.testing.assert_close(s["master"], p.detach(), rtol=0, atol=0)
    torch.testing.assert_close(s["exp_avg_sq"], opt.state[p]["exp_avg_sq"], rtol=0, atol=0)


def test_master_adamw_on_the_kernel_path_follows_fp32_adamw():
    """MasterAdamW's kernel path (what runs on a GPU) over fp16 weights and an fp32 one, several steps."""
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 9), (9,), (5, 5)]]
    low = [torch.nn.Parameter(ref[0].detach().half()), torch.nn.Parameter(ref[1].detach().half()),
           torch.nn.Parameter(ref[2].detach().clone())]
    kw = dict(lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=HP["weight_decay"])
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    opt = MasterAdamW(low, masters=dict(zip(low, ref)), **kw)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g).half() for p in ref]
        for p, q, gr in zip(ref, low, grads):
            p.grad, q.grad = gr.float(), gr.to(q.dtype)
        ref_opt.step()
        with force_triton():
            opt.step()
    for p, q in zip(ref, low):
        master = opt.state[q]["master"]
        torch.testing.assert_close(master, p.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(q.detach(), master.to(q.dtype))
        assert opt.state[q]["step"].device.type == "cpu" and int(opt.state[q]["step"]) == 4


def test_bad_state_is_refused_with_its_name():
    s = _state(8, torch.float16, seed=0)
    s["exp_avg"] = s["exp_avg"].half()
    with pytest.raises(ValueError, match="exp_avg must be fp32"):
        master_adamw_triton_(**s, step=1, **HP)
    with pytest.raises(ValueError, match="step count starts at 1"):
        master_adamw_torch_(**_state(8, torch.float16, seed=0), step=0, **HP)


PTX = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blocks.kernels import adamw

kernel = adamw._master_adamw_kernel
types = {"w_ptr": "*bf16", "g_ptr": "*bf16", "n": "i64", "BLOCK": "constexpr"}
names = kernel.arg_names
signature = {n: types.get(n, "*fp32" if n.endswith("_ptr") else "fp32") for n in names}
# what a launch specializes on for 16-byte aligned tensors of a multiple of 16 elements
aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr") or n == "n"}
src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index("BLOCK"),): adamw.BLOCK}, attrs=aligned)
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


def test_the_kernel_compiles_for_bf16_on_sm90():
    """bf16, what a GPU run hands the kernel, is the one dtype the interpreter cannot run: compile it for sm90
    on the CPU (a child process: this one interprets): it rounds to bf16 and moves every tensor in 16-byte
    vectors, the point of one pass at 28 bytes a weight."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", PTX], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cvt.rn.bf16" in out.stdout, "the master rounded to bf16 for the weight"
    assert "ld.global.b" not in out.stdout and "st.global.b" not in out.stdout, "a scalar load or store"
    assert out.stdout.count("ld.global.v4.b32") == out.stdout.count("st.global.v4.b32") > 0
