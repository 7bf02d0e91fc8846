"""Training-time sparsity: masks that hold during training, sparsity schedules, distillation.

``masks`` (which weights are kept, enforced on weights, gradients and optimizer state),
``schedules`` (what sparsity at step t: constant, Zhu & Gupta's cubic), ``criteria`` (which
weights: magnitude, unstructured or N:M), ``sparse_methods`` (the pure maths of RigL,
movement pruning and iterative magnitude pruning), ``gates`` (the maths of hard-concrete L0
gates and soft movement), ``gated`` (the hooks that put gates into the forward pass),
``strategies`` (mask-update strategies: ``gmp``, ``movement``, ``rigl``, ``imp``, ``l0``; the
interface methods plug into), ``imp`` (the rounds of ``--method imp``: prune, rewind,
retrain; the lottery-ticket controls), ``filters`` (CNN filter pruning: which filters, and the
rewrite of a smaller ``nn.Sequential``), ``distill`` (the loss), ``callback`` (the
``transformers.TrainerCallback``), ``loop`` (the same enforcement in a plain PyTorch loop, for a
CNN), ``trainer`` (the Trainer the CLI runs), ``evaluate`` (perplexity, tasks and loss
summaries of a run), ``run`` (the fine-tuning run behind ``python -m llmprune.finetune``). Mask convention: ``True`` = keep.
Nothing is imported here, so ``import llmprune.training`` stays cheap.
"""
