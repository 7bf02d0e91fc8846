"""Training windows and their order: the train split cut into ``seqlen`` windows, visited in a
seeded order that depends only on (seed, step), so a resumed run sees the same batches.

Windows are cut as evaluation cuts its stream (``llmprune.evaluation.perplexity.eval_windows``:
non-overlapping, tail dropped, BOS first for models that need it); a pre-tokenized
``[n, seqlen]`` file gives its rows verbatim.
"""

from __future__ import annotations

import hashlib

import torch
from torch.utils.data import IterableDataset

from llmprune.calibration import data
from llmprune.errors import UsageError


def train_windows(source: str, tokenizer, model, *, seqlen: int) -> torch.LongTensor:
    """int64 ``[n_windows, seqlen]`` on the CPU from ``source``'s train split (see module doc)."""
    from llmprune.evaluation.perplexity import eval_windows

    add_bos = data.needs_bos(tokenizer)
    if data._is_token_file(str(source)):  # pre-tokenized: rows as they are (the calibration reader's checks)
        tokens = data._load_token_file(data._local_path(str(source)), tokenizer)
        if tokens.dim() != 2 or tokens.shape[1] != seqlen:
            raise UsageError(f"{source!r} has shape {list(tokens.shape)}: a training token file must be "
                             f"[n, seqlen] with seqlen={seqlen}")
        return tokens.to(torch.long)
    stream = data.tokenize(data.load_text(str(source), "train"), tokenizer)
    return eval_windows(model, stream, seqlen=seqlen, source=str(source), add_bos=add_bos)


def sample_order(n_windows: int, n_samples: int, seed: int) -> torch.LongTensor:
    """The window index of each of ``n_samples`` training samples: epoch e visits all windows
    in ``torch.randperm(n_windows)`` of a generator seeded with ``seed + e``. int64 ``[n_samples]``."""
    epochs = -(-n_samples // n_windows)
    order = [torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed + e)) for e in range(epochs)]
    return torch.cat(order)[:n_samples]


def sha256(windows: torch.Tensor, order: torch.Tensor) -> str:
    """sha256 of the windows' token ids followed by the sample order (both int64)."""
    digest = hashlib.sha256(windows.to(torch.int64).numpy().tobytes())
    digest.update(order.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


class WindowDataset(IterableDataset):
    """Yields ``{"input_ids", "labels"}`` (both ``windows[i]``, int64 ``[seqlen]``) for ``i`` in
    ``order``: a Trainer batches them in this order (an iterable dataset is never shuffled,
    and on resume the Trainer skips the samples already seen)."""

    def __init__(self, windows: torch.Tensor, order: torch.Tensor):
        self.windows, self.order = windows, order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for i in self.order.tolist():
            row = self.windows[i]
            yield {"input_ids": row, "labels": row}
