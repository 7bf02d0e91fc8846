"""Command lines: ``python -m llmprune.sparsegpt | wanda | magnitude`` (``oneshot``) and
``python -m llmprune.push`` (``push``); ``common`` holds what they share.
"""
