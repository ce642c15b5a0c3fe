"""Attack-side evaluation: the paper's metrics and the attacker pipeline behind `dladiff evaluate`.

Entry points: :func:`dladiff.evaluate.run.evaluate` (one identity or a dataset, sharded over
``accelerate`` processes), :func:`dladiff.dataset.protect_dataset` (``protect --dataset``),
:func:`dladiff.evaluate.report.write_comparison` (several evaluations in one set of tables) and
:func:`dladiff.evaluate.config.evaluate_config_for_cli` (settings from ``configs/evaluate/``).
See ``docs/evaluate.md``.
"""
