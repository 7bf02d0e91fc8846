"""The layer-wise engine on tiny random models of eight architecture families.

Oracles are independent of the engine: a plain forward of the (pruned) model with hooks
on its decoder layers gives the arguments every layer really receives and the output of
the last decoder layer; the engine's captured arguments and propagated hidden states must
match them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf

from llmprune.calibration.capture import capture_layer_calls
from llmprune.oneshot.loop import LayerLoop
from llmprune.solvers import SparseGPTConfig
from llmprune.models.architecture import check_pattern_fits, find_decoder_layers, prunable_matrices
from llmprune.errors import UsageError
from llmprune.oneshot.methods import METHODS
from llmprune.patterns import NM, Unstructured

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def _configs() -> dict:
    return {
        # grouped-query attention and tied embeddings
        "llama": tf.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": tf.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8),
        "qwen2": tf.Qwen2Config(**SMALL, num_key_value_heads=2),
        "gemma3": tf.Gemma3TextConfig(
            **{**SMALL, "num_hidden_layers": 4},
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        "phi3": tf.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0),
        "opt": tf.OPTConfig(
            vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64,
        ),
        "gpt_neox": tf.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
        "gpt2": tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64),
    }


FAMILIES = list(_configs())


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = _configs()[family]
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    return model


def tokens(n: int = 4, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seqlen), generator=gen)


def record_real_calls(model, layers, ids):
    """Arguments each layer really gets and the last layer's output, from plain forwards."""
    calls = [[] for _ in layers]
    last_out = []
    handles = []
    for index, layer in enumerate(layers):
        def pre(module, args, kwargs, index=index):
            calls[index].append((args, dict(kwargs)))
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, out: last_out.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return calls, last_out


def assert_same_value(actual, expected, where: str) -> None:
    """Independent oracle for captured arguments: same structure, tensors equal element by element."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        assert torch.equal(actual, expected), f"{where}: tensor values differ"
    elif isinstance(expected, (tuple, list)):
        assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_same_value(a, e, f"{where}[{k}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a dict, got {type(actual).__name__}"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_value(actual[key], expected[key], f"{where}[{key!r}]")
    elif expected is None or isinstance(expected, (bool, int, float, str)):
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"
    else:
        pytest.fail(f"{where}: unexpected argument type {type(expected).__name__} in a real layer call")


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_records_what_each_layer_receives(family):
    model = build(family)
    _, layers = find_decoder_layers(model)
    ids = tokens()
    captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
    real, _ = record_real_calls(model, layers, ids)
    for index in range(len(layers)):
        for sample in range(len(ids)):
            args, kwargs = real[index][sample]
            call = captured.calls[index][sample]
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                assert torch.equal(captured.hidden[sample], hidden)
            rest = args[1:] if call.hidden_key == 0 else args
            kwargs = {k: v for k, v in kwargs.items() if k != call.hidden_key}
            assert_same_value(call.args, tuple(rest), f"layer {index} sample {sample} args")
            assert_same_value(call.kwargs, kwargs, f"layer {index} sample {sample} kwargs")


def test_gemma3_local_and_global_layers_get_different_arguments():
    model = build("gemma3")
    _, layers = find_decoder_layers(model)
    captured = capture_layer_calls(model, layers, tokens(2, 16), torch.device("cpu"), show_progress=False)
    local, global_ = captured.calls[0][0], captured.calls[1][0]
    cos_local, cos_global = local.kwargs["position_embeddings"][0], global_.kwargs["position_embeddings"][0]
    assert not torch.allclose(cos_local, cos_global), "rotary tables of sliding and full layers must differ"
    # layers of the same type share one stored object across samples and layers
    assert captured.calls[0][0] is captured.calls[0][1]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_pruned_model_matches_propagated_hidden_states(family, method):
    model = build(family)
    _, layers = find_decoder_layers(model)
    ids = tokens()
    captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
    config = SparseGPTConfig(blocksize=32) if method == "sparsegpt" else None
    reports = LayerLoop(layers, METHODS[method], NM(2, 4), torch.device("cpu"), config=config,
                        show_progress=False, output_errors=True).run(captured)
    # Pattern: every prunable matrix has at most 2 nonzeros in every 4 inputs.
    for layer in layers:
        for matrix in prunable_matrices(layer):
            weight = matrix.read_weight()
            groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert groups.max() <= 2, matrix.name
    # Each layer ran exactly two calibration forwards (statistics, propagation).
    assert all(r.forward_passes == 2 for r in reports)
    assert all(r.output_rel_error is not None and 0 < r.output_rel_error < 1.5 for r in reports)
    # The engine's final hidden states are what the pruned model really computes.
    _, last_out = record_real_calls(model, layers, ids)
    for sample in range(len(ids)):
        torch.testing.assert_close(captured.hidden[sample], last_out[sample], rtol=1e-5, atol=1e-5)


def test_shared_inputs_share_one_statistic_and_groups_follow_call_order():
    model = build("llama")
    _, layers = find_decoder_layers(model)
    captured = capture_layer_calls(model, layers, tokens(3), torch.device("cpu"), show_progress=False)
    created = []

    class CountingHessian(METHODS["sparsegpt"].statistic):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    method = METHODS["sparsegpt"]
    counting = dataclasses.replace(method, statistic=CountingHessian)
    reports = LayerLoop(layers, counting, Unstructured(0.5), torch.device("cpu"), show_progress=False).run(captured)
    assert reports[0].groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    assert len(created) == 4 * len(layers)
    assert all(stat.n_samples == 3 for stat in created)


@pytest.mark.parametrize("sequential", [False, True], ids=["one-pass", "true-sequential"])
def test_statistics_pass_stops_at_the_last_input_it_needs(sequential):
    # Without output errors each statistics forward after the first stops before the last
    # matrix it feeds runs (down_proj, or the active group's last matrix with true_sequential);
    # the statistics, hence the pruned weights, are bitwise those of whole forwards.
    ids = tokens(4)
    results = {}
    for output_errors in (True, False):
        model = build("llama")
        _, layers = find_decoder_layers(model)
        captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
        ran = []
        handle = layers[1].mlp.down_proj.register_forward_hook(lambda *_: ran.append(1))
        reports = LayerLoop(layers, METHODS["sparsegpt"], Unstructured(0.5), torch.device("cpu"),
                            true_sequential=sequential, output_errors=output_errors, show_progress=False).run(captured)
        handle.remove()
        results[output_errors] = ([p.clone() for p in model.parameters()], captured.hidden, len(ran), reports)
    (whole, whole_hidden, whole_ran, whole_reports), (early, early_hidden, early_ran, early_reports) = results[True], results[False]
    assert all(torch.equal(a, b) for a, b in zip(whole, early))
    assert all(torch.equal(a, b) for a, b in zip(whole_hidden, early_hidden))
    passes = 4 if sequential else 1  # statistics passes per layer
    assert whole_ran == len(ids) * (passes + 1)  # every statistics forward whole, plus the propagation
    # stopping: of the statistics forwards only each pass's first reaches down_proj (the others
    # stop at or before its input); the propagation runs whole
    assert early_ran == passes + len(ids)
    assert all(r.output_rel_error is not None for r in whole_reports)
    assert all(r.output_rel_error is None for r in early_reports)


def test_one_hessian_factorisation_per_shared_input():
    # q/k/v share one factorisation, gate/up another: 4 per Llama layer, not 7.
    model = build("llama")
    _, layers = find_decoder_layers(model)
    captured = capture_layer_calls(model, layers, tokens(3), torch.device("cpu"), show_progress=False)
    method = METHODS["sparsegpt"]
    factorised = []

    def counting_prepare(hessian, config, device):
        factorised.append(hessian.shape[0])
        return method.prepare(hessian, config, device)

    counting = dataclasses.replace(method, prepare=counting_prepare)
    reports = LayerLoop(layers, counting, Unstructured(0.5), torch.device("cpu"), show_progress=False).run(captured)
    assert len(factorised) == 4 * len(layers)
    assert all(len(r.matrices) == 7 for r in reports)


def test_true_sequential_adds_one_forward_per_group_and_differs():
    ids = tokens()
    results = {}
    for sequential in (False, True):
        model = build("llama")
        _, layers = find_decoder_layers(model)
        captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
        reports = LayerLoop(layers, METHODS["sparsegpt"], Unstructured(0.5), torch.device("cpu"),
                            true_sequential=sequential, show_progress=False).run(captured)
        results[sequential] = (reports, layers[1].mlp.down_proj.weight.clone())
    assert [r.forward_passes for r in results[True][0]] == [5] * 3
    assert not torch.equal(results[False][1], results[True][1])


def test_unstructured_sparsity_is_exact_per_matrix():
    model = build("qwen2")
    _, layers = find_decoder_layers(model)
    captured = capture_layer_calls(model, layers, tokens(), torch.device("cpu"), show_progress=False)
    reports = LayerLoop(layers, METHODS["wanda"], Unstructured(0.7), torch.device("cpu"), show_progress=False).run(captured)
    for report in reports:
        for m in report.matrices:
            out, inp = m.shape
            # Wanda compares per output row: each row loses exactly int(in * 0.7) weights.
            assert m.sparsity == pytest.approx(out * int(inp * 0.7) / (out * inp), abs=1e-9), m.name


def test_excluded_matrices_stay_dense():
    model = build("llama")
    _, layers = find_decoder_layers(model)
    before = layers[0].mlp.down_proj.weight.clone()
    captured = capture_layer_calls(model, layers, tokens(2), torch.device("cpu"), show_progress=False)
    LayerLoop(layers, METHODS["wanda"], NM(2, 4), torch.device("cpu"), exclude=("mlp.down_proj",),
              show_progress=False).run(captured)
    assert torch.equal(layers[0].mlp.down_proj.weight, before)
    assert (layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5


def test_magnitude_needs_no_data_and_gpt2_conv1d_is_pruned_along_inputs():
    model = build("gpt2")
    _, layers = find_decoder_layers(model)
    reports = LayerLoop(layers, METHODS["magnitude"], NM(2, 4), torch.device("cpu"), show_progress=False).run(None)
    weight = layers[0].mlp.c_proj.weight  # Conv1D: [in=256, out=64]
    assert weight.shape == (256, 64)
    groups = (weight.t() != 0).reshape(64, -1, 4).sum(-1)
    assert groups.max() <= 2 and groups.min() == 2
    assert {m.name for m in reports[0].matrices} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


def test_pattern_that_does_not_divide_names_the_layer():
    model = build("llama")
    _, layers = find_decoder_layers(model)
    with pytest.raises(UsageError, match=r"layer 0 self_attn.q_proj.*64.*multiple of 48"):
        check_pattern_fits(layers, NM(3, 48))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_batched_calibration_gives_the_statistics_of_one_window_at_a_time(family, method):
    # --calib-batch-size 3 over 5 windows: forwards of windows 0-2 and 3-4. Nothing is pruned
    # (sparsity 0), so both runs see the same inputs in every layer, and every statistic must
    # equal the one-window-at-a-time statistic to fp32 rounding (another summation order),
    # with the same sample counts; the propagated hidden states too.
    ids = tokens(5)
    runs = {}
    for batch_size in (1, 3):
        model = build(family)
        _, layers = find_decoder_layers(model)
        captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
        seen, forwards = [], []

        class Recording(METHODS[method].statistic):
            def value(self):
                out = super().value()
                seen.append((self.n_samples, self.n_tokens, out.clone()))
                return out

        handle = layers[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
        recording = dataclasses.replace(METHODS[method], statistic=Recording)
        LayerLoop(layers, recording, Unstructured(0.0), torch.device("cpu"), show_progress=False,
                  calib_batch_size=batch_size).run(captured)
        handle.remove()
        runs[batch_size] = seen, captured.hidden, len(forwards)
    (one, one_hidden, one_forwards), (batched, batched_hidden, batched_forwards) = runs[1], runs[3]
    assert (one_forwards, batched_forwards) == (2 * 5, 2 * 2)  # statistics + propagation forwards of layer 0
    assert len(one) == len(batched) > 0
    for (n1, t1, v1), (n3, t3, v3) in zip(one, batched):
        assert (n1, t1) == (n3, t3) == (5, 5 * ids.shape[1])
        if v1.dim() == 2:  # a Hessian: rounding is relative to the entry's Cauchy-Schwarz bound
            bound = 1e-5 * (v1.diagonal().unsqueeze(1) * v1.diagonal().unsqueeze(0)).sqrt() + 1e-9
            assert bool(((v3 - v1).abs() <= bound).all()), float(((v3 - v1).abs() / bound).max())
        else:
            torch.testing.assert_close(v3, v1, rtol=1e-5, atol=1e-7)
    for a, b in zip(one_hidden, batched_hidden):
        assert a.shape == b.shape == (1, ids.shape[1], 64)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_batched_calibration_prunes_like_one_window_at_a_time():
    # A real pruning run (Wanda 2:4, SparseGPT 50 %) with 4 windows per forward: the same masks
    # as one window per forward on this model (statistics equal to rounding), weights to rounding.
    ids = tokens(6)
    for method, pattern in (("wanda", NM(2, 4)), ("sparsegpt", Unstructured(0.5))):
        weights = {}
        for batch_size in (1, 4):
            model = build("llama")
            _, layers = find_decoder_layers(model)
            captured = capture_layer_calls(model, layers, ids, torch.device("cpu"), show_progress=False)
            LayerLoop(layers, METHODS[method], pattern, torch.device("cpu"), show_progress=False,
                      calib_batch_size=batch_size).run(captured)
            weights[batch_size] = [m.read_weight().clone() for layer in layers for m in prunable_matrices(layer)]
        for a, b in zip(weights[1], weights[4]):
            assert torch.equal(a == 0, b == 0), method
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_calib_batch_size_must_be_positive():
    from llmprune.pipeline import prune

    with pytest.raises(UsageError, match=r"--calib-batch-size must be a positive integer, got 0"):
        prune("smollm2-135m", sparsity=0.5, calib_batch_size=0)
