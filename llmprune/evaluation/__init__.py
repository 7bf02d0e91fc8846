"""Evaluation: perplexity with the SparseGPT/Wanda papers' protocol (``perplexity``).
"""
