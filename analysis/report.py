"""A report on one run (expert utilization) or on an experiment / Optuna study (router comparison, scaling).

    python -m analysis.report <run id | experiment | study> [--out DIR] [--tracking-uri URI] [--format html|md]
    python -m analysis.report <experiment> --comparison    # routers side by side: one table and one figure

With --comparison the runs are arms of one comparison (same model, data and token budget, different routing;
`experiment=router_comparison` writes this report itself): the newest finished run of each arm is compared.

HTML (default): one self-contained file, figures embedded as base64 PNGs. Markdown: report.md beside the PNGs.
Either way the PNGs are also written to DIR/figures/.
"""
from __future__ import annotations

import argparse
import base64
import html
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from analysis import plots
from analysis.comparison import VAL_UNITS, arm_name, latest_per_arm, router_rows, val_key
from analysis.metrics import byte_label, top_tokens_table
from analysis.runs import (checkpoint_paths, client, find_runs, load_matrix, load_snapshots, moe_layer_names,
                           run_label, total_counters, utilization_history)
from analysis.saturation import checkpoint_saturation, snapshot_saturation
from analysis.scaling import fit_families, scaling_points


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Path] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # first row is the header
    pre: str = ""  # preformatted text


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _token_label(run: Run):
    byte_level = run.data.params.get("data.tokenizer", "byte") == "byte" and run.data.params.get("data.name") != "memmap"
    return byte_label if byte_level else (lambda v: f"#{v}")


def _overview(run: Run) -> Section:
    m, p = run.data.metrics, run.data.params
    key = val_key([run])
    rows = [
        ("run", f"{run_label(run)} ({run.info.run_id})"),
        ("family / mixer / router", f"{run.data.tags.get('family')} / {p.get('mixer.name')} / {p.get('router.name')}"),
        ("experts, top_k", f"{p.get('moe.num_experts')}, {p.get('moe.top_k')}"),
        ("parameters total / active", f"{p.get('params_total')} / {p.get('params_active')}"),
        ("training tokens / FLOPs", f"{_fmt(m.get('train/tokens_total', math.nan))} / {_fmt(m.get('train/flops_total', math.nan))}"),
        (f"final {key} ({VAL_UNITS[key]})", _fmt(m.get(key, math.nan))),
        ("data", run.data.tags.get("data", "")),
    ]
    return Section("Run", table=[["", ""], *map(list, rows)])


def _saturation(run: Run, snaps: list, layers: list[str], name: str, fig_dir: Path) -> Section:
    sat = Section("Router saturation", "Eval-mode routing of the first validation batch at each validation, compared "
                  "with the last validation (OLMoE's router saturation: the share of each token's final top-k experts "
                  "already chosen).")
    steps, agreement = snapshot_saturation(snaps)
    if not len(steps):
        sat.text = "No routing was recorded at validation (a run from before utilization snapshots)."
        return sat
    p = run.data.params
    chance = int(p.get("moe.top_k", 1)) / int(p.get("moe.num_experts", 1))
    sat.figures.append(plots.save(plots.saturation_curves(steps, agreement, f"{name}: router saturation", chance),
                                  fig_dir / "saturation.png"))
    ckpts = checkpoint_paths(run)
    if ckpts:
        rows = checkpoint_saturation(ckpts, snaps[-1]["val_token_ids"])
        sat.table = [["checkpoint", "step", *layers]] + [[ckpt, str(step), *(f"{a[layer]:.1%}" for layer in layers)]
                                                         for ckpt, step, a in rows]
        sat.text += (" The table routes the same batch through each checkpoint file the run kept (the train loop "
                     "keeps last.ckpt and best.ckpt only) and compares it with the latest.")
    return sat


def run_sections(c: MlflowClient, run: Run, fig_dir: Path) -> list[Section]:
    """Overview, load heatmaps, utilization over training, co-activation, top tokens, router saturation."""
    overview = _overview(run)
    layers = moe_layer_names(run)
    if not layers:
        overview.text = "This run has no MoE layer: there is no expert utilization to show."
        return [overview]
    name = run_label(run)
    snaps = load_snapshots(c, run)
    history = plots.utilization_over_training(utilization_history(c, run), f"{name}: expert utilization over training")
    balance = Section("Load balance and entropy over training", "Per-layer metrics logged at each validation, over "
                      "the training steps since the one before.", [plots.save(history, fig_dir / "utilization_over_training.png")])
    if not snaps:
        overview.text = "This run has no utilization snapshots (it predates them): only the logged metrics are shown."
        return [overview, balance]

    last = int(snaps[-1]["step"])
    prev = int(snaps[-2]["step"]) if len(snaps) > 1 else 0
    whole = plots.load_heatmap(load_matrix(snaps, layers), layers, f"{name}: expert load, training steps 0-{last}")
    recent = plots.load_heatmap(load_matrix(snaps, layers, last_only=True), layers, f"{name}: expert load, steps {prev}-{last}")
    load = Section("Expert load", "Slots each expert processed in training, over the uniform load (1 = balanced): "
                   "over the whole run, and since the previous validation.",
                   [plots.save(whole, fig_dir / "load_heatmap_total.png"), plots.save(recent, fig_dir / "load_heatmap_final.png")])

    total = {layer: total_counters(snaps, layer) for layer in layers}
    co = {layer: total[layer]["coactivation"] for layer in layers}
    coactivation = Section("Expert co-activation", "Each token had a single expert (top-1 routing): the co-activation "
                           "matrix is diagonal, so there is nothing to plot.")
    if any((c_EE - np.diag(np.diag(c_EE))).sum() > 0 for c_EE in co.values()):
        coactivation.text = "How often expert j also processes a token that expert i processes (training routing, whole run)."
        fig = plots.coactivation_heatmaps(co, f"{name}: expert co-activation, training steps 0-{last}")
        coactivation.figures.append(plots.save(fig, fig_dir / "coactivation.png"))

    label = _token_label(run)
    tables = [f"{layer}\n{top_tokens_table(t['token_expert'], 8, label, t.get('token_counts'))}"
              for layer, t in total.items() if t["token_expert"].size]
    tokens = Section("Expert specialisation by token", "Per expert: share of all slots, then its most frequent tokens "
                     "with their share of the expert's slots and p = P(expert | token), the fraction of that token's "
                     "occurrences the expert processed (1 = it takes every occurrence).",
                     pre="\n\n".join(tables) or "token counts were not recorded")
    return [overview, load, balance, coactivation, tokens, _saturation(run, snaps, layers, name, fig_dir)]


def experiment_sections(c: MlflowClient, runs: list[Run], fig_dir: Path, title: str) -> list[Section]:
    """Runs table, router comparison (MoE runs) and scaling fits per family."""
    key = val_key(runs)
    table = [["run", "family", "router", "params total", "params active", "train FLOPs", key]]
    for r in runs:
        m, p = r.data.metrics, r.data.params
        router = p.get("router.name", "") if moe_layer_names(r) else "-"
        table.append([run_label(r), r.data.tags.get("family", ""), router, f"{int(p.get('params_total', 0)):,}",
                      f"{int(p.get('params_active', 0)):,}", _fmt(m.get("train/flops_total", math.nan)),
                      _fmt(m.get(key, math.nan))])
    sections = [Section("Runs", f"{len(runs)} runs.", table=table)]
    rows = router_rows(c, runs)
    if len({r["router"] for r in rows}) >= 2:
        data = {r["data"] for r in rows}
        note = "All on the same data." if len(data) == 1 else f"Careful: the runs used different data: {sorted(data)}."
        sections.append(Section("Router comparison", note + " Load statistics describe the training-time routing.",
                                [plots.save(plots.router_comparison(rows, f"{title}: routers side by side"),
                                            fig_dir / "router_comparison.png")],
                                table=[["run", "load CV", "router entropy", "load entropy", "drop rate", key]] +
                                      [[r["label"], *(_fmt(r[k]) for k in ("load_cv", "router_entropy", "load_entropy",
                                                                           "drop_rate", "val"))] for r in rows]))
    points = scaling_points(runs, key)
    loss_label = f"{key} ({VAL_UNITS[key]})"
    scaling = Section("Scaling", f"Fits of L = a·x^(-b) + c to the final {key}, per model family (compute), and per "
                      "family and token budget (parameters). Standard errors from the Jacobian (they need more than "
                      "3 runs); where the best irreducible loss c would be negative, c is pinned at 0 and b comes "
                      "from a log-log regression (see analysis/scaling.py).")
    for x in ("flops", "params_active"):
        fits = fit_families(points, x)
        if not fits:
            continue
        what = "compute" if x == "flops" else "active parameters at fixed data"
        scaling.figures.append(plots.save(plots.scaling_fits(fits, f"{title}: loss vs {what}", loss_label),
                                          fig_dir / f"scaling_{x}.png"))
        scaling.table += ([["group", "x", "runs", "fit"]] if not scaling.table else []) + [
            [f.group, x, str(len(f.points)), (f.fit.describe() if f.fit else "") + (f" [{f.note}]" if f.note else "")]
            for f in fits]
    if scaling.figures:
        sections.append(scaling)
    return sections


SETUP_KEYS = ("mixer.name", "model.d_model", "model.n_layers", "model.ffn_dim", "moe.num_experts", "moe.top_k",
              "moe.granularity", "moe.capacity_factor", "data.name", "data.seq_len", "data.batch_size",
              "trainer.max_steps", "trainer.accumulate_grad_batches", "optim.lr", "seed")
RESULT_COLUMNS = (  # header, row key, format
    ("load CV", "load_cv", ".3f"), ("max / mean load", "max_over_mean_load", ".2f"),
    ("router entropy", "router_entropy", ".3f"), ("load entropy", "load_entropy", ".3f"),
    ("slots dropped", "drop_rate", ".2%"), ("tokens without expert", "no_expert_rate", ".2%"),
    ("tokens/s", "tokens_per_s", ",.0f"),
)


def _cell(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _stands_out(value, key: str, arm_params: list[dict]) -> bool:
    """Whether an arm's value of `key` sets it apart: it differs from the value most arms with the key have
    (all values, where no value is more common than another)."""
    if value is None:
        return False
    counts = Counter(p[key] for p in arm_params if key in p)
    top = max(counts.values())
    return counts[value] < top or list(counts.values()).count(top) > 1


def comparison_sections(c: MlflowClient, runs: list[Run], fig_dir: Path, title: str) -> list[Section]:
    """Arms of a router comparison side by side: what they share, one results table (final validation metric,
    load balance, entropies, dropped slots and tokens, throughput) and one figure (plots.router_comparison)."""
    rows = router_rows(c, runs)
    if not rows:
        raise ValueError(f"{title}: no finished run with MoE layers to compare")
    key = rows[0]["val_key"]
    params = {r.info.run_id: r.data.params for r in runs}
    arm_params = [params[row["run_id"]] for row in rows]
    options = sorted({k for p in arm_params for k in p if k.startswith(("router.", "moe.")) and k != "router.name"})
    differing = [k for k in options if len({p.get(k) for p in arm_params}) > 1]

    setup = [["setting", "value"]]
    for k in SETUP_KEYS:
        values = {p.get(k) for p in arm_params}
        if values != {None}:
            setup.append([k, values.pop() if len(values) == 1 else "differs (see the results)"])
    tokens = {row["tokens_total"] for row in rows}
    setup.append(["training tokens per arm", ", ".join(_cell(t, ",.0f") for t in sorted(tokens))])
    data = sorted({row["data"] for row in rows})
    setup.append(["data", data[0] if len(data) == 1 else "DIFFERS: " + " | ".join(data)])
    same = len(tokens) == 1 and len(data) == 1
    text = (f"{len(rows)} arms: the same model, data and token budget, routed differently." if same else
            f"Careful: these {len(rows)} runs differ in data or token budget; the comparison is not like for like.")

    results = [["arm", "router", "settings", "params active", f"final {key}",
                *(header for header, _, _ in RESULT_COLUMNS)]]
    for row, p in zip(rows, arm_params):
        settings = ", ".join(f"{k.split('.', 1)[1]}={p[k]}" for k in differing if _stands_out(p.get(k), k, arm_params))
        results.append([row["label"], row["router"], settings or "-", f"{row['params_active']:,}",
                        _cell(row["val"], ".4f"), *(_cell(row[k], spec) for _, k, spec in RESULT_COLUMNS)])
    note = (f"Final {key} ({VAL_UNITS[key]}) on the held-out data at the end of training. Load statistics describe "
            "the training-time routing over the last validation interval, as means over the MoE layers: load CV "
            "(std / mean of the slots per expert, 0 = balanced), max / mean load (the busiest expert's share over "
            "the mean: what bounds an expert-parallel step), router entropy (per token, normalised: 1 = uniform), "
            "load entropy (of the aggregate load, normalised), slots dropped by a capacity limit, and tokens that no "
            "expert processed (dropped entirely, or chosen by no expert under expert choice). tokens/s is the "
            "mean training throughput over the run, measured on the machine that trained it.")
    figure = plots.save(plots.router_comparison(rows, f"{title}: routers side by side"), fig_dir / "router_comparison.png")
    return [Section("Setup", text, table=setup), Section("Results", note, [figure], table=results),
            *_unfinished_section(runs)]


def _unfinished_section(runs: list[Run]) -> list[Section]:
    """The arms among `runs` that did not finish (a crash, a divergence, a signal), with why: a comparison
    must say which arms are missing from its table rather than leave them out silently."""
    unfinished = [r for r in runs if r.info.status != "FINISHED"]
    if not unfinished:
        return []
    table = [["arm", "run", "status", "reason"]] + [
        [arm_name(r), r.info.run_id, r.info.status, r.data.tags.get("end_reason", "")] for r in unfinished]
    return [Section("Arms that did not finish", f"{len(unfinished)} arm(s) are not in the results: "
                    f"{', '.join(arm_name(r) for r in unfinished)}.", table=table)]


def comparison_report(ref: str, out: str | Path, tracking_uri: str | None = None, fmt: str = "md",
                      run_ids: list[str] | None = None) -> Path:
    """Write the router comparison of `ref` (an experiment or study: the newest finished run of each arm; or
    exactly the runs `run_ids`) under `out`: report.md or report.html, and figures/router_comparison.png."""
    c = client(tracking_uri)
    runs = [c.get_run(i) for i in run_ids] if run_ids else latest_per_arm(find_runs(ref, c))
    out = Path(out)
    sections = comparison_sections(c, runs, out / "figures", ref)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        return write_markdown(f"Router comparison: {ref}", sections, out / "report.md")
    return write_html(f"Router comparison: {ref}", sections, out / "report.html")


def _table_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(title: str, sections: list[Section], path: Path) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "img{max-width:100%;display:block;margin:1em 0}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
             f"</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.table:
            parts.append(_table_html(s.table))
        if s.pre:
            parts.append(f"<pre>{html.escape(s.pre)}</pre>")
        for fig in s.figures:
            data = base64.b64encode(fig.read_bytes()).decode()
            parts.append(f"<img alt='{html.escape(fig.stem)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_markdown(title: str, sections: list[Section], path: Path) -> Path:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.table:
            lines += ["| " + " | ".join(s.table[0]) + " |", "|" + "---|" * len(s.table[0])]
            lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in s.table[1:]] + [""]
        if s.pre:
            lines += ["```", s.pre, "```", ""]
        lines += [f"![{fig.stem}]({fig.relative_to(path.parent).as_posix()})" for fig in s.figures] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def build_report(ref: str, out: str | Path, tracking_uri: str | None = None, fmt: str = "html") -> Path:
    """Write the report on `ref` (a run id, experiment or study) under `out`; returns the report file."""
    c = client(tracking_uri)
    runs = find_runs(ref, c)
    out = Path(out)
    fig_dir = out / "figures"
    if len(runs) == 1 and runs[0].info.run_id == ref:
        title = f"Expert utilization of run {run_label(runs[0])}"
        sections = run_sections(c, runs[0], fig_dir)
    else:
        title = f"Report on {ref}"
        sections = experiment_sections(c, runs, fig_dir, ref)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "md":
        return write_markdown(title, sections, out / "report.md")
    return write_html(title, sections, out / "report.html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="an MLflow run id, experiment name, or Optuna study name")
    parser.add_argument("--out", default=None, help="output folder (default outputs/analysis/<ref>)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db)")
    parser.add_argument("--format", choices=("html", "md"), default="html")
    parser.add_argument("--comparison", action="store_true",
                        help="compare the newest run of each arm (routers side by side) instead")
    args = parser.parse_args(argv)
    try:
        out = args.out or Path("outputs") / "analysis" / args.ref
        make = comparison_report if args.comparison else build_report
        path = make(args.ref, out, args.tracking_uri, args.format)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
