"""Expert-utilization and scaling analysis of tracked runs.

metrics     pure functions on arrays: load balance, entropies, co-activation, specialisation, agreement
runs        read runs, metric histories and utilization snapshots from MLflow (run id, experiment or study)
saturation  router saturation: agreement of routing at step t with the final routing, per layer
scaling     L(x) = a * x^(-b) + c fits (x = training FLOPs or parameters) per model family
plots       matplotlib figures of all of the above
report      `python -m analysis.report <run-or-experiment>`: a self-contained HTML report
route       `python -m analysis.route ckpt=<any checkpoint> data=...`: the utilization report of a model run over
            text without training (released and home-trained models alike)

See docs/analysis.md.
"""
