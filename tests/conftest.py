"""Shared fixtures. Tests never reach the network: the Hub is offline for the whole session."""

from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def word_tokenizer(text: str, size: int = 400):
    """A real word-level tokenizer over the most frequent words of ``text`` (BOS is not added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    counts = Counter(w for w in text.split() if w not in specials)
    words = [w for w, _ in counts.most_common(size - len(specials))]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def ptb_train_text() -> str:
    from llmprune.calibration.data import load_text

    return load_text("ptb", "train")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, ptb_train_text):
    """A saved 3-layer Llama (GQA, tied embeddings) with a word tokenizer built from PTB train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer(ptb_train_text)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, restored afterwards: on a busy 2-core machine a
    10-token forward of a tiny model took 650 ms with 2 threads and 1.5 ms with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
