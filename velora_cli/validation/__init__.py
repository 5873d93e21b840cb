"""`velora validate`: velora's estimates held against published GPU measurements.

The corpus (``validation/published/*.json``, described in ``validation/README.md``) holds measured
training runs that other projects published, each with its setup. This package loads them
(corpus.py), maps each setup to velora's `StepSpec` and the estimate backend's settings for the
case's GPU, CUDA version and training loop, or says what velora cannot express yet (mapping.py:
one table, grown as features land), predicts, and compares every tier the source measured
(compare.py: signed errors, the bounds CI gates on, the summary per source and GPU). run.py
composes them; rendering lives in `velora_cli.report.validate`.

Layer: between the commands and the search (it composes the estimate backend, nothing above it).
"""
