"""Evaluation: perplexity, LAMBADA and lm-eval tasks."""
