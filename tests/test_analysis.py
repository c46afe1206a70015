"""Expert-utilization counters, their logging in training, the analysis library, the report and scaling fits."""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils._python_dispatch import TorchDispatchMode

from analysis import metrics, plots, runs, scaling
from analysis.comparison import router_rows
from analysis.report import build_report, comparison_report, main as report_main
from analysis.saturation import checkpoint_routing, checkpoint_saturation, snapshot_saturation
from blocks.moe import MoE, MoEConfig
from conftest import tiny_argv
from experiments.config import compose
from experiments.train import train
from experiments.utilization import load_snapshot
from routers import Router, Routing

ROUTERS = {"top1": [], "sinkhorn": [], "expert_choice": [], "topk": ["top_k=2"]}
_TINY: dict = {}


def tiny_experiments(tmp_path_factory) -> dict:
    """Tiny runs shared by this module and test_notebooks (made once per session): experiment `routers`
    (one run per router, 6 steps, a validation every 2) and experiment `scaling` (BlackMamba at three widths,
    dense Mamba at two)."""
    if not _TINY:
        out = tmp_path_factory.mktemp("analysis-runs")
        ids = {}
        for router, extra in ROUTERS.items():
            cfg = compose(tiny_argv(out, "trainer.max_steps=6", "trainer.val_every=2", "tracking.experiment=routers",
                                    f"router={router}", *extra))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="router=expert_choice is not causal")
                ids[router] = train(cfg).run_id
        for mlp, widths in (("moe", (16, 32, 64)), ("mlp", (16, 32))):
            for d in widths:
                train(compose(tiny_argv(out, "trainer.max_steps=4", "trainer.val_every=4", "tracking.experiment=scaling",
                                        f"model.mlp={mlp}", f"model.d_model={d}", f"model.ffn_dim={2 * d}")))
        _TINY.update(out=out, uri=f"sqlite:///{out.resolve() / 'mlflow.db'}", ids=ids)
    return _TINY


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return tiny_experiments(tmp_path_factory)


@pytest.fixture(scope="module")
def client(tiny_runs):
    return MlflowClient(tiny_runs["uri"])


# ------------------------------------------------------------------ metrics on a hand-built routing

# 6 tokens, top-2 over 4 experts; token 5's second slot is empty. Loads: e0 4, e1 3, e2 2, e3 2 (11 slots).
IDS_TK = np.array([[0, 1], [0, 2], [1, 0], [3, 0], [1, 3], [2, 0]])
MASK_TK = np.array([[True, True], [True, True], [True, True], [True, True], [True, True], [True, False]])
TOKENS_T = np.array([7, 7, 3, 3, 3, 9])


def test_metrics_of_a_hand_built_routing():
    counts = np.array([4, 3, 2, 2])
    assert metrics.load_cv(counts) == pytest.approx(np.sqrt(0.6875) / 2.75)
    assert metrics.max_over_mean(counts) == pytest.approx(4 / 2.75)
    p = counts / 11
    assert metrics.load_entropy(counts) == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert metrics.load_entropy([5, 5, 5, 5]) == pytest.approx(1.0) and metrics.load_entropy([0, 9, 0, 0]) == 0.0
    assert metrics.load_cv([3, 3, 3]) == 0.0 and math.isnan(metrics.load_cv([0, 0]))
    np.testing.assert_allclose(metrics.token_entropy(np.array([[0.25] * 4, [1, 0, 0, 0]])), [1.0, 0.0])
    np.testing.assert_allclose(metrics.relative_load([[4, 3, 2, 2]]), [[4 / 2.75, 3 / 2.75, 2 / 2.75, 2 / 2.75]])

    co = metrics.coactivation(IDS_TK, 4, MASK_TK)
    expected = np.array([[4, 2, 1, 1], [2, 3, 0, 1], [1, 0, 2, 0], [1, 1, 0, 2]])  # (0, 1): tokens 0 and 2
    np.testing.assert_array_equal(co, expected)
    cond = metrics.coactivation_conditional(co)
    assert cond[0, 1] == pytest.approx(2 / 4) and cond[1, 0] == pytest.approx(2 / 3) and cond[2, 2] == 1.0

    assert metrics.routing_agreement(IDS_TK, IDS_TK) == 1.0
    assert metrics.routing_agreement(IDS_TK[:, ::-1], IDS_TK) == 1.0  # sets, not slot order
    other = IDS_TK.copy()
    other[0] = [2, 3]  # token 0 now shares no expert with the reference, the rest all
    assert metrics.routing_agreement(other, IDS_TK) == pytest.approx(5 / 6)
    assert metrics.routing_agreement(np.array([[0], [1]]), np.array([[0], [-1]])) == 1.0  # empty reference skipped

    token_expert = np.zeros((10, 4), dtype=np.int64)
    np.add.at(token_expert, (np.repeat(TOKENS_T, 2)[MASK_TK.ravel()], IDS_TK.ravel()[MASK_TK.ravel()]), 1)
    top = metrics.top_tokens(token_expert, k=2, token_counts_V=np.bincount(TOKENS_T, minlength=10))
    assert top[0][0] == (3, 2, 0.5, pytest.approx(2 / 3))  # expert 0: token 3 twice, half its load, 2 of 3 occurrences
    table = metrics.top_tokens_table(token_expert, 3)
    assert table.splitlines()[0].startswith("e0 (36.4% of slots): 0x03 50.0%")


class FixedRouter(Router):
    """Routes by a fixed table whatever the logits, with fixed auxiliary losses."""

    def __init__(self, num_experts, ids_TK, mask_TK=None):
        super().__init__(num_experts, ids_TK.shape[1])
        self.ids_TK, self.mask_TK = ids_TK, mask_TK

    def route(self, logits_TE):
        probs_TE = torch.softmax(logits_TE.float(), -1)
        aux = {"balance": torch.tensor(0.25), "z": torch.tensor(0.5)}
        return Routing(self.ids_TK, torch.ones(self.ids_TK.shape), probs_TE, self.mask_TK, aux)


def fixed_moe(capacity_factor=None) -> MoE:
    moe = MoE(8, MoEConfig(num_experts=4, top_k=2, router="topk", capacity_factor=capacity_factor), 16).train()
    moe.router = FixedRouter(4, torch.from_numpy(IDS_TK), torch.from_numpy(MASK_TK))
    moe.track_tokens(10)
    return moe


def test_moe_counters_of_a_hand_built_routing():
    moe = fixed_moe()
    for _ in range(2):
        moe.observe_tokens(torch.from_numpy(TOKENS_T)[None])
        moe(torch.randn(1, 6, 8))
    moe.eval()(torch.randn(1, 6, 8))  # eval forwards count nothing
    arrays = {k: v.numpy() for k, v in moe.utilization_arrays().items()}
    np.testing.assert_array_equal(arrays["tokens_per_expert"], [8, 6, 4, 4])
    np.testing.assert_array_equal(arrays["coactivation"], 2 * metrics.coactivation(IDS_TK, 4, MASK_TK))
    np.testing.assert_array_equal(arrays["token_counts"], 2 * np.bincount(TOKENS_T, minlength=10))
    assert arrays["token_expert"][3].tolist() == [4, 4, 0, 4] and arrays["token_expert"].sum() == 22
    stats = moe.utilization_stats()
    assert stats["load_cv"] == pytest.approx(metrics.load_cv([4, 3, 2, 2]))
    assert stats["load_entropy"] == pytest.approx(metrics.load_entropy([4, 3, 2, 2]), rel=1e-6)
    assert stats["aux_balance"] == pytest.approx(0.25) and stats["aux_z"] == pytest.approx(0.5)
    summary = metrics.layer_summary({**arrays, "aux_names": np.array(MoE.AUX_LOSS_NAMES)})
    for key in ("load_cv", "max_over_mean_load", "load_entropy", "router_entropy", "drop_rate", "aux_balance"):
        assert summary[key] == pytest.approx(stats[key], rel=1e-5), key
    moe.reset_utilization()
    assert all(int(v.count_nonzero()) == 0 for v in moe.utilization_arrays().values())
    moe.train()(torch.randn(1, 6, 8))  # tokens not observed: token counters stay untouched, the rest counts
    assert moe.token_counts.sum() == 0 and moe.tokens_per_expert.sum() == 11


def test_capacity_drops_leave_the_coactivation_and_token_counters():
    moe = fixed_moe(capacity_factor=0.5)  # capacity ceil(0.5 * 6 * 2 / 4) = 2 slots per expert
    moe.observe_tokens(torch.from_numpy(TOKENS_T))
    moe(torch.randn(1, 6, 8))
    co = moe.coactivation.numpy()
    np.testing.assert_array_equal(np.diag(co), moe.tokens_per_expert.numpy())
    assert moe.tokens_per_expert.tolist() == [2, 2, 2, 2] and moe.dropped_tokens.item() == 3
    assert moe.token_expert.sum().item() == 8 and moe.token_counts.sum().item() == 6


class NoHostSync(TorchDispatchMode):
    """Fails on operations that read device data back to the host (or give data-dependent shapes)."""

    aten = torch.ops.aten
    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten._unique2}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func.overloadpacket is self.aten.index and any(t is not None and t.dtype == torch.bool for t in args[1])
        assert func.overloadpacket not in self.SYNCING and not bool_index, f"host synchronisation: {func}"
        return func(*args, **(kwargs or {}))


def test_counter_updates_never_synchronise_with_the_host(monkeypatch):
    moe = fixed_moe(capacity_factor=0.5)
    routing = moe.router(torch.randn(6, 4))
    kept = torch.ones(6, 2, dtype=torch.bool)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist in a counter update"))
    with NoHostSync():
        moe._update_utilization(routing, kept, torch.from_numpy(TOKENS_T))
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        moe.tokens_per_expert.sum().item()


# ------------------------------------------------------------------ logged in training

def test_training_logs_utilization_per_layer_and_snapshots(tiny_runs, client):
    run = client.get_run(tiny_runs["ids"]["topk"])
    layers = runs.moe_layer_names(run)
    assert layers == ["layer1", "layer3"]
    for layer in layers:
        for stat in ("load_cv", "max_over_mean_load", "load_entropy", "router_entropy", "drop_rate", "aux_balance",
                     "aux_z", "tokens_per_expert/0", "tokens_per_expert/3"):
            steps, _ = runs.metric_history(client, run.info.run_id, f"moe/{layer}/{stat}")
            assert steps.tolist() == [2, 4, 6], (layer, stat)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "utilization")]
    assert artifacts == [f"utilization/step_{s:06d}.npz" for s in (2, 4, 6)]

    snaps = runs.load_snapshots(client, run)
    assert [int(s["step"]) for s in snaps] == [2, 4, 6]
    for snap in snaps:
        for layer in layers:
            a = runs.layer_arrays(snap, layer)
            assert a["num_tokens"] == 2 * 4 * 32 and a["tokens_per_expert"].sum() == a["routed_slots"] == 2 * a["num_tokens"]
            np.testing.assert_array_equal(np.diag(a["coactivation"]), a["tokens_per_expert"])
            np.testing.assert_array_equal(a["token_expert"].sum(0), a["tokens_per_expert"])
            assert a["token_counts"].sum() == a["num_tokens"] and a["val_expert_ids"].shape == (4 * 32, 2)
            # the raw arrays reproduce what was logged at the same step
            logged = {stat: dict(zip(*runs.metric_history(client, run.info.run_id, f"moe/{layer}/{stat}")))
                      for stat in ("load_cv", "load_entropy", "router_entropy", "aux_balance")}
            for stat, value in metrics.layer_summary(a).items():
                if stat in logged:
                    assert value == pytest.approx(logged[stat][int(snap["step"])], rel=1e-5), stat
    # the npz is also beside the run, and loads on its own
    local = runs.run_dir(run) / "utilization" / "step_000006.npz"
    assert set(load_snapshot(local)) == set(snaps[-1])


def test_snapshots_come_from_the_artifact_store_when_the_run_dir_is_elsewhere(tiny_runs, client, monkeypatch):
    run = client.get_run(tiny_runs["ids"]["topk"])
    local = runs.load_snapshots(client, run)
    monkeypatch.setattr(runs, "run_dir", lambda run: None)
    files = runs.snapshot_files(client, run)
    assert [f.name for f in files] == ["step_000002.npz", "step_000004.npz", "step_000006.npz"]
    assert "analysis-runs" not in str(files[0])  # downloaded, not read in place
    downloaded = runs.load_snapshots(client, run)
    np.testing.assert_array_equal(downloaded[-1]["layer1/token_expert"], local[-1]["layer1/token_expert"])


def test_every_router_logs_its_own_losses(tiny_runs, client):
    sinkhorn = client.get_run(tiny_runs["ids"]["sinkhorn"]).data.metrics
    assert "moe/layer1/load_cv" in sinkhorn and "moe/layer1/aux_balance" not in sinkhorn  # sinkhorn has no balance loss
    expert_choice = client.get_run(tiny_runs["ids"]["expert_choice"]).data.metrics
    assert expert_choice["moe/layer1/load_cv"] == pytest.approx(0.0)  # every expert filled to capacity


def test_router_saturation_from_snapshots_and_checkpoints(tiny_runs, client):
    run = client.get_run(tiny_runs["ids"]["topk"])
    snaps = runs.load_snapshots(client, run)
    steps, agreement = snapshot_saturation(snaps)
    assert steps.tolist() == [2, 4, 6] and set(agreement) == {"layer1", "layer3"}
    for values in agreement.values():
        assert values[-1] == 1.0 and ((0 <= values) & (values <= 1)).all()
    ckpts = runs.checkpoint_paths(run)
    assert [p.name for p in ckpts] == ["best.ckpt", "last.ckpt", "prev.ckpt"]
    rows = checkpoint_saturation(ckpts, snaps[-1]["val_token_ids"])
    assert rows[-1][1] == 6 and all(v == 1.0 for v in rows[-1][2].values())
    # the final checkpoint routes the val batch exactly as the last validation recorded it
    step, routed = checkpoint_routing(ckpts[1], snaps[-1]["val_token_ids"])
    assert step == 6
    for layer, ids in routed.items():
        np.testing.assert_array_equal(ids, snaps[-1][f"{layer}/val_expert_ids"])


def test_find_runs_by_id_experiment_and_study(tiny_runs, client):
    ids = tiny_runs["ids"]
    assert [r.info.run_id for r in runs.find_runs(ids["top1"], client)] == [ids["top1"]]
    assert {r.info.run_id for r in runs.find_runs("routers", client)} == set(ids.values())
    assert len(runs.find_runs("scaling", client)) == 5
    # a study: a parent run (in its own experiment) whose children point to it, or runs tagged optuna.study
    parent = client.create_run(client.create_experiment("sweep-parents"), run_name="study-a")
    for router in ("top1", "sinkhorn"):
        client.set_tag(ids[router], "mlflow.parentRunId", parent.info.run_id)
    client.set_tag(ids["topk"], "optuna.study", "study-b")  # as sweeps/ tags its trials
    assert {r.info.run_id for r in runs.find_runs("study-a", client)} == {ids["top1"], ids["sinkhorn"]}
    assert [r.info.run_id for r in runs.find_runs("study-b", client)] == [ids["topk"]]
    assert {r.info.run_id for r in runs.find_runs("routers", client)} == set(ids.values())  # parent elsewhere
    with pytest.raises(ValueError, match="experiments: .*routers"):
        runs.find_runs("no-such-thing", client)


def test_router_comparison_rows(tiny_runs, client):
    rows = router_rows(client, runs.find_runs("routers", client))
    assert [r["router"] for r in rows] == list(ROUTERS)
    for r in rows:
        assert r["val_key"] == "val/bpb" and np.isfinite(r["val"]) and r["cv_steps"].tolist() == [2, 4, 6]
        assert 0 < r["router_entropy"] <= 1 and 0 < r["load_entropy"] <= 1


def test_comparison_report_has_one_table_and_one_figure(tiny_runs, tmp_path, capsys):
    path = comparison_report("routers", tmp_path, tiny_runs["uri"], fmt="md")
    text = path.read_text()
    assert path.name == "report.md" and text.count("![router_comparison](figures/router_comparison.png)") == 1
    assert (tmp_path / "figures" / "router_comparison.png").stat().st_size > 20_000
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = table[table.index(next(t for t in table if t.startswith("| arm")))]
    for column in ("final val/bpb", "load CV", "router entropy", "slots dropped", "tokens without expert", "tokens/s"):
        assert column in header
    rows = {line.split(" | ")[0][2:].split()[0]: line for line in table if line.split(" | ")[0][2:].split()[0] in ROUTERS}
    assert set(rows) == set(ROUTERS)
    assert "top_k=2" in rows["topk"] and "top_k" not in rows["top1"]  # what sets an arm apart from the others
    # expert choice leaves some tokens to no expert; the dropless top-k routers leave none
    assert rows["topk"].split(" | ")[10] == "0.00%" and rows["expert_choice"].split(" | ")[10] != "0.00%"
    assert report_main(["routers", "--comparison", "--out", str(tmp_path / "html"), "--tracking-uri", tiny_runs["uri"]]) == 0
    assert images_in((tmp_path / "html" / "report.html").read_text()) == 1
    assert capsys.readouterr().out.strip().endswith("report.html")


# ------------------------------------------------------------------ report

def images_in(html: str) -> int:
    return len(re.findall(r"<img alt='[^']+' src='data:image/png;base64,[A-Za-z0-9+/=]{1000,}'>", html))


def test_report_on_a_run_and_on_experiments(tiny_runs, tmp_path, capsys):
    run_id = tiny_runs["ids"]["topk"]
    path = build_report(run_id, tmp_path / "run", tiny_runs["uri"])
    html = path.read_text()
    assert path.name == "report.html" and images_in(html) == 5  # 2 load heatmaps, history, co-activation, saturation
    for heading in ("Expert load", "Load balance and entropy over training", "Expert co-activation",
                    "Expert specialisation by token", "Router saturation"):
        assert f"<h2>{heading}</h2>" in html
    top1 = build_report(tiny_runs["ids"]["top1"], tmp_path / "top1", tiny_runs["uri"]).read_text()
    assert "co-activation matrix is diagonal" in top1 and images_in(top1) == 4

    assert report_main(["routers", "--out", str(tmp_path / "routers"), "--tracking-uri", tiny_runs["uri"]]) == 0
    html = (tmp_path / "routers" / "report.html").read_text()
    assert "<h2>Router comparison</h2>" in html and images_in(html) == 3  # comparison, two scaling plots
    assert capsys.readouterr().out.strip().endswith("report.html")

    md = build_report("scaling", tmp_path / "scaling", tiny_runs["uri"], fmt="md")
    text = md.read_text()
    assert "![scaling_flops](figures/scaling_flops.png)" in text and (md.parent / "figures" / "scaling_flops.png").stat().st_size > 10_000
    assert "Router comparison" not in text  # one router only

    assert report_main(["nope", "--tracking-uri", tiny_runs["uri"]]) == 2
    assert "no run id, experiment or study" in capsys.readouterr().err
    assert report_main(["x", "--tracking-uri", f"sqlite:///{tmp_path / 'missing.db'}"]) == 2


def test_figures_have_titles_labels_and_colour_bars():
    rng = np.random.default_rng(0)
    heat = plots.load_heatmap(rng.integers(1, 100, (3, 4)), ["layer1", "layer3", "layer5"], "load")
    co = plots.coactivation_heatmaps({"layer1": metrics.coactivation(IDS_TK, 4, MASK_TK)}, "co-activation")
    steps = np.array([2, 4, 6])
    history = {"layer1": {s: (steps, rng.random(3)) for s in ("load_cv", "max_over_mean_load", "load_entropy",
                                                              "router_entropy", "drop_rate", "aux_z")}}
    hist = plots.utilization_over_training(history, "history")
    sat = plots.saturation_curves(steps, {"layer1": np.array([0.5, 0.8, 1.0])}, "saturation", 0.25)
    for fig in (heat, co, hist, sat):
        plotted = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        for ax in plotted:
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), fig
            if ax.lines:
                assert ax.get_legend() is not None, ax.get_title()
    assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() for ax in heat.axes)
    assert any(ax.get_label() == "<colorbar>" and ax.get_ylabel() for ax in co.axes)


# ------------------------------------------------------------------ scaling

def test_scaling_fit_recovers_known_exponents():
    rng = np.random.default_rng(0)
    C = np.logspace(15, 20, 10)
    for a, b, c in ((2e3, 0.25, 1.8), (50.0, 0.1, 0.5), (1e6, 0.4, 2.5)):
        y = a * C ** (-b) + c
        exact = scaling.fit_power_law(C, y)
        assert exact.b == pytest.approx(b, rel=1e-4) and exact.c == pytest.approx(c, rel=1e-4)
        assert exact.a == pytest.approx(a, rel=1e-3) and exact.converged
        noisy = scaling.fit_power_law(C, y * (1 + 0.002 * rng.standard_normal(C.size)))
        assert abs(noisy.b - b) < max(3 * noisy.se_b, 0.02) and 0 < noisy.se_b < 0.1, noisy.describe()
        np.testing.assert_allclose(noisy.predict(C), y, rtol=0.01)
    three = scaling.fit_power_law(C[:3], 3 * C[:3] ** -0.05 + 1)
    assert math.isnan(three.se_b) and "no error bar" in three.describe()
    # points bending the wrong way: c pinned at 0, a pure power law fitted in log space
    pinned = scaling.fit_power_law(np.array([1e6, 1e7, 1e8, 1e9]), np.array([7.9, 7.7, 7.2, 6.4]))
    assert pinned.c_fixed and pinned.c == 0 and pinned.b > 0 and np.isfinite(pinned.se_b)
    with pytest.raises(ValueError, match="3 distinct"):
        scaling.fit_power_law(np.array([1.0, 1.0, 2.0]), np.array([3.0, 2.0, 1.0]))


def test_scaling_on_tiny_runs(tiny_runs, client):
    points = scaling.scaling_points(runs.find_runs("scaling", client), "val/bpb")
    assert len(points) == 5 and {p.family for p in points} == {"blackmamba", "mamba"}
    by_group = {f.group: f for f in scaling.fit_families(points, "flops")}
    fit = by_group["blackmamba"].fit
    assert fit is not None and np.isfinite([fit.a, fit.b, fit.c]).all() and fit.n == 3
    assert by_group["mamba"].fit is None and "need 3" in by_group["mamba"].note
    sizes = scaling.fit_families(points, "params_active")
    assert [f.group for f in sizes] == ["blackmamba @ 512 tokens", "mamba @ 512 tokens"]
    fig = plots.scaling_fits(sizes, "tiny", "val/bpb (bits per byte)")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "parameters" in ax.get_xlabel() and ax.get_legend() is not None
