"""Perplexity protocol against an independent per-token loop on a tiny random Llama."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmprune.errors import UsageError
from llmprune.evaluation.perplexity import PerplexityResult, perplexity

VOCAB = 61
BOS = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=2,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform predictions; sharpen them so token-level errors show.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (1, 103), generator=g)


def hand_nll(model, stream: torch.Tensor, seqlen: int, *, add_bos: bool, max_tokens: int | None = None):
    """Independent reference: explicit windows, then -log_softmax of each target in fp64, one token at a time."""
    tokens = stream[0].tolist()
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    step = seqlen - 1 if add_bos else seqlen
    total, count, windows = 0.0, 0, 0
    pos = 0
    while pos + step <= len(tokens):
        window = ([BOS] if add_bos else []) + tokens[pos : pos + step]
        assert len(window) == seqlen
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0].double()
        for p in range(1, seqlen):
            total += -torch.log_softmax(logits[p - 1], dim=-1)[window[p]].item()
            count += 1
        pos += step
        windows += 1
    return total / count, count, windows


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("seqlen", [10, 16])
def test_matches_hand_computation(tiny_llama, stream, seqlen, add_bos):
    result = perplexity(tiny_llama, stream, seqlen=seqlen, add_bos=add_bos, source="rand", show_progress=False)
    nll, count, windows = hand_nll(tiny_llama, stream, seqlen, add_bos=add_bos)
    assert isinstance(result, PerplexityResult)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert (result.n_tokens, result.n_windows, result.seqlen, result.source) == (count, windows, seqlen, "rand")
    # Every window predicts seqlen - 1 tokens, with or without BOS.
    step = seqlen - 1 if add_bos else seqlen
    assert result.n_windows == 103 // step
    assert result.n_tokens == result.n_windows * (seqlen - 1)


def test_ppl_is_not_trivial(tiny_llama, stream):
    """Guards the tolerance above: the sharpened model is far from uniform on random tokens."""
    result = perplexity(tiny_llama, stream, seqlen=10, show_progress=False)
    assert abs(result.ppl - VOCAB) > 5


def test_tail_is_dropped(tiny_llama, stream):
    # 103 tokens, seqlen 10 -> 10 windows; tokens 100..102 must not matter.
    changed = stream.clone()
    changed[0, 100:] = (changed[0, 100:] + 7) % VOCAB
    a = perplexity(tiny_llama, stream, seqlen=10, show_progress=False)
    b = perplexity(tiny_llama, changed, seqlen=10, show_progress=False)
    assert a.n_windows == 10
    assert a.nll == b.nll
    # ... but a token inside the last window does.
    changed[0, 95] = (changed[0, 95] + 7) % VOCAB
    assert perplexity(tiny_llama, changed, seqlen=10, show_progress=False).nll != a.nll


@pytest.mark.parametrize("add_bos", [False, True], ids=["no-bos", "bos"])
def test_max_tokens_uses_whole_windows(tiny_llama, stream, add_bos):
    result = perplexity(tiny_llama, stream, seqlen=10, max_tokens=55, add_bos=add_bos, show_progress=False)
    nll, count, windows = hand_nll(tiny_llama, stream, 10, add_bos=add_bos, max_tokens=55)
    assert result.n_windows == windows == 55 // (9 if add_bos else 10)
    assert result.n_tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    truncated = perplexity(tiny_llama, stream[:, : 5 * 10], seqlen=10, show_progress=False)
    if not add_bos:
        assert result.nll == pytest.approx(truncated.nll, rel=1e-6)


def test_batch_size_does_not_change_result(tiny_llama, stream):
    one = perplexity(tiny_llama, stream, seqlen=8, batch_size=1, show_progress=False)
    three = perplexity(tiny_llama, stream, seqlen=8, batch_size=3, show_progress=False)  # 12 windows: 3+3+3+3
    five = perplexity(tiny_llama, stream, seqlen=8, batch_size=5, show_progress=False)  # 5+5+2 (partial batch)
    assert (one.n_windows, one.n_tokens) == (three.n_windows, three.n_tokens) == (five.n_windows, five.n_tokens)
    assert three.nll == pytest.approx(one.nll, rel=1e-5)
    assert five.nll == pytest.approx(one.nll, rel=1e-5)


def test_one_dimensional_tokens_accepted(tiny_llama, stream):
    assert perplexity(tiny_llama, stream[0], seqlen=10, show_progress=False) == perplexity(
        tiny_llama, stream, seqlen=10, show_progress=False
    )


class Uniform(torch.nn.Module):
    """Predicts every token with equal probability; records what it was fed."""

    def __init__(self, vocab: int, bos_token_id=None):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(bos_token_id=bos_token_id)
        self.calls = []

    def forward(self, input_ids, use_cache=True):
        self.calls.append((input_ids.clone(), use_cache, torch.is_inference_mode_enabled() or not torch.is_grad_enabled()))
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.bfloat16) + self.anchor.to(torch.bfloat16)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("vocab", [50, 49152])
def test_uniform_model_has_ppl_equal_to_vocab(vocab):
    model = Uniform(vocab)
    tokens = torch.randint(0, vocab, (1, 40))
    result = perplexity(model, tokens, seqlen=8, show_progress=False)
    assert result.ppl == pytest.approx(vocab, rel=1e-6)
    assert result.nll == pytest.approx(math.log(vocab), rel=1e-7)


def test_windows_fed_to_model_with_and_without_bos():
    tokens = torch.arange(100, 130).unsqueeze(0)  # 30 stream tokens
    model = Uniform(200, bos_token_id=7)
    perplexity(model, tokens, seqlen=6, add_bos=True, batch_size=2, show_progress=False)
    fed = torch.cat([c[0] for c in model.calls])
    # stride 5 -> 6 windows of [bos] + 5 stream tokens, consecutive and non-overlapping
    expected = torch.cat([torch.full((6, 1), 7), torch.arange(100, 130).reshape(6, 5)], dim=1)
    assert torch.equal(fed, expected)
    assert all(use_cache is False and no_grad for _, use_cache, no_grad in model.calls)

    model.calls.clear()
    result = perplexity(model, tokens, seqlen=7, show_progress=False)
    fed = torch.cat([c[0] for c in model.calls])
    assert torch.equal(fed, torch.arange(100, 128).reshape(4, 7))  # tail of 2 dropped
    assert (result.n_windows, result.n_tokens) == (4, 24)


def test_restores_training_mode(tiny_llama, stream):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, stream, seqlen=10, show_progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_bf16_logits_are_upcast(tiny_llama, stream):
    model = LlamaForCausalLM(tiny_llama.config).to(torch.bfloat16).eval()
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in tiny_llama.state_dict().items()})
    result = perplexity(model, stream, seqlen=16, show_progress=False)
    nll, _, _ = hand_nll(model, stream, 16, add_bos=False)
    assert result.nll == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seqlen": 0}, "seqlen=0"),
        ({"seqlen": 1, "add_bos": True}, "seqlen=1"),
        ({"seqlen": 10, "batch_size": 0}, "batch_size=0"),
        ({"seqlen": 10, "max_tokens": 0}, "max_tokens=0"),
        ({"seqlen": 200}, "103 tokens"),
        ({"seqlen": 10, "max_tokens": 9}, "9 tokens"),
    ],
    ids=["seqlen0", "bos-seqlen1", "batch0", "max0", "too-few", "max-too-few"],
)
def test_bad_arguments_raise_usage_error(tiny_llama, stream, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        perplexity(tiny_llama, stream, show_progress=False, **kwargs)


def test_bad_shape_and_missing_bos():
    with pytest.raises(UsageError, match=r"\[2, 20\]"):
        perplexity(Uniform(50), torch.zeros(2, 20, dtype=torch.long), seqlen=4, show_progress=False)
    with pytest.raises(UsageError, match="bos_token_id"):
        perplexity(Uniform(50, bos_token_id=None), torch.zeros(1, 20, dtype=torch.long), seqlen=4, add_bos=True, show_progress=False)
