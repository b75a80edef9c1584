"""Measuring models: perplexity and accuracy, lm-evaluation-harness tasks, per-layer statistics, spectra."""
