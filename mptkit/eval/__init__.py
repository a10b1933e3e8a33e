"""Evaluation: perplexity (nonoverlapping and sliding), length extrapolation, multiple choice."""
