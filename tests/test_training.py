"""Training-time sparsity (``llmprune.training``) and ``python -m llmprune.finetune``: masks that
hold under AdamW, the cubic schedule's sparsities, the distillation KL against hand-computed
values, the TrainerCallback against the CLI, kill -9 then --resume, checkpoints, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import llmprune
from llmprune.patterns import NM
from llmprune.training.callback import COMPLETE_FILE, SparsityCallback
from llmprune.training.criteria import magnitude_masks
from llmprune.training.data import WindowDataset, sample_order, train_windows
from llmprune.training.distill import kl_divergence
from llmprune.training.masks import MaskSet, as_rows
from llmprune.training.schedules import CubicSchedule, cubic_for_run
from llmprune.training.strategies import GradualMagnitude

from conftest import word_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmprune.finetune", *args]


@pytest.fixture(scope="module")
def train_text(tmp_path_factory, ptb_train_text) -> str:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(ptb_train_text[:40_000])
    return str(path)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory, ptb_train_text) -> str:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(ptb_train_text[-8_000:])
    return str(path)


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory, tiny_llama_dir, train_text):
    """The tiny Llama pruned by magnitude to 2:4 and to 50 % unstructured (llmprune checkpoints)."""
    root = tmp_path_factory.mktemp("pruned")
    out = {}
    for label, options in {"2of4": {"pattern": "2:4"}, "u50": {"sparsity": 0.5}}.items():
        llmprune.prune(str(tiny_llama_dir), method="magnitude", dataset=train_text, eval="none", nsamples=2,
                       seqlen=16, device="cpu", progress=False, save=str(root / label), **options)
        out[label] = root / label
    return out


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D weights, stored [in, out]
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masks_survive_50_steps_of_adamw_with_weight_decay(family, one_thread):
    model = tiny(family)
    masks = MaskSet.dense(model)
    assert len(masks.masks) == (7 if family == "llama" else 4) * 2
    rows = {n: masks.weight_rows(n) for n in masks.masks}
    masks.update({n: as_rows(k, masks.weights[n][1]) for n, k in magnitude_masks(rows, 0.5, pattern=NM(2, 4)).items()})
    masks.attach()
    before = {n: p.detach().clone() for n, (p, _) in masks.weights.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, 96, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        masks.apply_to_weights()
        optimizer.zero_grad()
    for name, (param, transposed) in masks.weights.items():
        keep = masks.masks[name]
        assert int(keep.sum()) * 2 == keep.numel()
        assert bool((param[~keep] == 0).all()), name
        w = as_rows(param.detach(), transposed)  # [out, in]
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name
        state = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert bool((state[key][~keep] == 0).all()), (name, key)
            assert float(state[key][keep].abs().sum()) > 0  # the kept weights did train
        assert not torch.equal(param[keep], before[name][keep])


def test_masks_from_zeros_of_a_pruned_checkpoint(pruned_dirs):
    model = tf.AutoModelForCausalLM.from_pretrained(pruned_dirs["2of4"])
    masks = MaskSet.from_zeros(model)
    assert len(masks.masks) == 3 * 7 and abs(masks.sparsity() - 0.5) < 1e-9
    masks.check_pattern(NM(2, 4))
    unstructured = MaskSet.from_zeros(tf.AutoModelForCausalLM.from_pretrained(pruned_dirs["u50"]))
    with pytest.raises(llmprune.UsageError, match="is not 2:4"):
        unstructured.check_pattern(NM(2, 4))


# ------------------------------------------------------------------------------ schedule


def test_cubic_schedule_hits_hand_computed_sparsities_at_every_pruning_step(one_thread):
    # s_t = 0.5 + (0 - 0.5) (1 - k/4)^3 at t = 2 + 3k: 0, 0.2890625, 0.4375, 0.4921875, 0.5
    schedule = CubicSchedule(0.0, 0.5, start=2, every=3, n_updates=4)
    hand = {2: 0.0, 5: 0.2890625, 8: 0.4375, 11: 0.4921875, 14: 0.5}
    assert [t for t in range(30) if schedule.is_update_step(t)] == list(hand)
    for t, s in hand.items():
        assert schedule.sparsity_at(t) == s
    assert schedule.sparsity_at(0) == 0.0 and schedule.sparsity_at(29) == 0.5
    # pruned counts of a 16 x 32 (512), 32 x 32 (1024) and 64 x 32 (2048) matrix: int(numel * s_t)
    counts = {512: [0, 148, 224, 252, 256], 1024: [0, 296, 448, 504, 512], 2048: [0, 592, 896, 1008, 1024]}
    for pattern in (None, NM(2, 4)):
        model = tiny("llama")
        masks = MaskSet.dense(model).attach()
        strategy = GradualMagnitude(schedule, pattern)
        strategy.begin(masks)
        generator = torch.Generator().manual_seed(1)
        seen = []
        for t in range(1, 20):
            with torch.no_grad():  # stands in for training: every weight moves a little
                for p, _ in masks.weights.values():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.01)
                masks.apply_to_weights()
            before = {n: m.clone() for n, m in masks.masks.items()}
            changed = strategy.after_step(masks, t)
            assert changed == (t in hand)
            if not changed:
                assert all(torch.equal(before[n], masks.masks[n]) for n in before)
                continue
            seen.append(t)
            k = list(hand).index(t)
            for name, keep in masks.masks.items():
                assert int((~keep).sum()) == counts[keep.numel()][k], (pattern, t, name)
                if pattern is not None:  # never more than m - n pruned per group; exactly 2:4 at the end
                    rows = masks.rows(name)  # [out, in]
                    pruned = (~rows).reshape(rows.shape[0], -1, 4)
                    assert int(pruned.sum(-1).max()) <= 2
                    if t == 14:
                        assert bool((pruned.sum(-1) == 2).all())
        assert seen == [2, 5, 8, 11, 14]


def test_global_magnitude_removes_the_global_count():
    weights = {"a": torch.tensor([[0.1, 5.0], [0.2, 0.3]]), "b": torch.tensor([[4.0, 0.05, 3.0, 0.4]])}
    keep = magnitude_masks(weights, 0.5, scope="global")  # 8 weights, remove the 4 smallest: .05 .1 .2 .3
    assert keep["a"].tolist() == [[False, True], [False, False]]
    assert keep["b"].tolist() == [[True, False, True, True]]


def test_cubic_for_run_ends_at_three_quarters():
    schedule = cubic_for_run(0.0, 0.5, steps=600, every=50)
    assert (schedule.start, schedule.end, schedule.n_updates) == (0, 450, 9)


# ------------------------------------------------------------------------------ distillation


def test_kl_is_zero_for_the_same_logits_and_matches_a_hand_computed_value():
    logits = torch.randn(2, 5, 11)
    assert float(kl_divergence(logits, logits.clone(), 2.0)) == 0.0
    ln3 = math.log(3.0)
    teacher = torch.tensor([[ln3, 0.0], [0.0, 0.0]])  # p_t = (3/4, 1/4), (1/2, 1/2)
    student = torch.tensor([[0.0, 0.0], [0.0, ln3]])  # p_s = (1/2, 1/2), (1/4, 3/4)
    token1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    token2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl_divergence(student, teacher, 1.0)) == pytest.approx((token1 + token2) / 2, rel=1e-6)
    assert float(kl_divergence(student, teacher, 1.0, reduction="sum")) == pytest.approx(token1 + token2, rel=1e-6)
    # T = 2: softmax(ln3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); the term is scaled by T^2 = 4
    r = math.sqrt(3.0)
    pt, ps = (r / (r + 1), 1 / (r + 1)), (0.5, 0.5)
    t1 = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    t2 = sum(a * math.log(a / b) for a, b in zip(ps, pt[::-1]))
    assert float(kl_divergence(student, teacher, 2.0)) == pytest.approx(4 * (t1 + t2) / 2, rel=1e-6)


def test_teacher_never_receives_gradients():
    from llmprune.training.trainer import Teacher

    student, teacher = tiny("llama"), Teacher(tiny("llama"), "cpu")
    ids = torch.randint(0, 96, (2, 8))
    logits, _ = teacher(ids)
    kl_divergence(student(input_ids=ids).logits, logits, 2.0).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert any(p.grad is not None for p in student.parameters())


# ------------------------------------------------------------------------------ CLI, Trainer, resume


def test_trainer_callback_gives_the_cli_weights(tiny_llama_dir, train_text, tmp_path, one_thread):
    """A user's own transformers.Trainer with SparsityCallback (gradual 0 -> 50 %) trains to
    bitwise the weights the CLI saves, for the same seed."""
    steps, batch, seqlen, seed = 8, 2, 32, 3
    run = subprocess.run(cli("--model", str(tiny_llama_dir), "--teacher", "none", "--dataset", train_text,
                             "--steps", str(steps), "--seqlen", str(seqlen), "--batch-size", str(batch), "--lr", "1e-3",
                             "--weight-decay", "0.01", "--seed", str(seed), "--schedule", "cubic", "--sparsity-to", "0.5",
                             "--prune-every", "2", "--eval", "none", "--device", "cpu", "--no-progress",
                             "--save", str(tmp_path / "cli")), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_llama_dir)
    windows = train_windows(train_text, tokenizer, model, seqlen=seqlen)
    masks = MaskSet.dense(model)
    strategy = GradualMagnitude(cubic_for_run(0.0, 0.5, steps=steps, every=2))
    args = tf.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                                learning_rate=1e-3, weight_decay=0.01, seed=seed, report_to="none", use_cpu=True,
                                save_strategy="no", disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=WindowDataset(windows, sample_order(len(windows), steps * batch, seed)),
                         callbacks=[SparsityCallback(masks, strategy)])
    trainer.train()
    saved = weights_of(tmp_path / "cli")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    assert abs(masks.sparsity() - 0.5) < 1e-9
    meta = json.loads((tmp_path / "cli" / "llmprune.json").read_text())
    assert meta["recipe"]["finetune"]["strategy"]["schedule"]["kind"] == "cubic"
    assert meta["results"]["sparsity"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory, ptb_train_text):
    """A wider 4-layer Llama (dense) and its 2:4 magnitude checkpoint, steps slow enough to kill between saves."""
    tokenizer = word_tokenizer(ptb_train_text)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("slow")
    tf.LlamaForCausalLM(config).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    text = root / "calib.txt"
    text.write_text(ptb_train_text[:40_000])
    llmprune.prune(str(root / "dense"), method="magnitude", pattern="2:4", dataset=str(text), eval="none",
                   nsamples=2, seqlen=16, device="cpu", progress=False, save=str(root / "2of4"))
    return root


def test_kill_9_then_resume_equals_an_uninterrupted_run(slow_pair, train_text, tmp_path):
    common = ["--model", str(slow_pair / "2of4"), "--dataset", train_text, "--steps", "24", "--seqlen", "64",
              "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--distill-weight", "0.7", "--distill-temp", "2",
              "--eval", "none", "--device", "cpu", "--no-progress", "--save-format", "compressed"]
    reference = subprocess.run(cli(*common, "--save", str(tmp_path / "reference"), "--results",
                                   str(tmp_path / "reference.json")), env=ENV, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    work = tmp_path / "work"
    run = subprocess.Popen(cli(*common, "--work-dir", str(work), "--save-every", "4", "--save", str(tmp_path / "never")),
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if (work / "checkpoint-8" / COMPLETE_FILE).is_file():
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, f"the run was not killed partway: {run.stderr.read()[-3000:]!r}"
    assert not (tmp_path / "never").exists()
    assert not (work / "checkpoint-24").exists()

    resumed = subprocess.run(cli(*common, "--work-dir", str(work), "--resume", "--save", str(tmp_path / "resumed"),
                                 "--results", str(tmp_path / "resumed.json")), env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights_of_any(tmp_path / "reference"), weights_of_any(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    want, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("reference", "resumed"))
    assert got["resumed_from_step"] >= 8 and want["resumed_from_step"] == 0
    assert [r["loss"] for r in got["loss_curve"]] == [r["loss"] for r in want["loss_curve"]]
    assert len(want["loss_curve"]) == 24
    model = llmprune.load(tmp_path / "resumed")  # checks every weight's declared 2:4 pattern and nonzero count
    assert model is not None


def weights_of_any(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_python_function_saves_a_checkpoint_with_the_recipe(pruned_dirs, tiny_llama_dir, train_text, eval_text,
                                                            tmp_path, one_thread):
    result = llmprune.finetune(str(pruned_dirs["2of4"]), dataset=train_text, steps=4, seqlen=32, batch_size=2,
                               grad_accum=2, lr=1e-3, eval=eval_text, max_eval_tokens=256, device="cpu", progress=False,
                               gradient_checkpointing=True, save=str(tmp_path / "ft"))
    assert result.teacher == str(tiny_llama_dir)  # the base model recorded in the checkpoint
    assert set(result.before_ppl) == set(result.after_ppl) == {eval_text}
    meta = json.loads((tmp_path / "ft" / "llmprune.json").read_text())
    ft = meta["recipe"]["finetune"]
    assert ft["teacher"] == str(tiny_llama_dir) and ft["steps"] == 4 and ft["tokens_seen"] == 4 * 2 * 2 * 32
    assert ft["lr"] == 1e-3 and ft["strategy"]["schedule"] == {"kind": "constant"} and len(ft["data"]["sha256"]) == 64
    assert ft["loss"]["steps_logged"] == 4
    assert all(row["tokens_per_s"] > 0 and row["kl"] >= 0 and row["lm_loss"] > 0 for row in result.loss_curve[1:])
    assert meta["recipe"]["method"] == "magnitude" and meta["recipe"]["pattern"] == {"kind": "nm", "n": 2, "m": 4}
    assert all(e["pattern"] == {"kind": "nm", "n": 2, "m": 4} for e in meta["pruned_weights"].values())
    assert "## Fine-tuning" in (tmp_path / "ft" / "README.md").read_text()
    model = llmprune.load(tmp_path / "ft")
    MaskSet.from_zeros(model).check_pattern(NM(2, 4))


def test_finetune_is_the_module_and_the_function_in_either_import_order():
    checks = [
        "import llmprune; f = llmprune.finetune; from llmprune.finetune import finetune; import llmprune.finetune as m",
        "from llmprune.finetune import finetune; import llmprune; f = llmprune.finetune; import llmprune.finetune as m",
    ]
    for code in checks:
        code += ("; from llmprune.training.run import finetune as real; assert f is m and callable(f) and "
                 "m.finetune is real and finetune is real; f(None)")
        run = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
        assert "UsageError: --model is required" in run.stderr, run.stderr[-2000:]


# ------------------------------------------------------------------------------ bad input


def bad_cases(pruned_dirs, other_vocab_dir):
    dense = ["--steps", "2", "--seqlen", "16", "--batch-size", "2", "--eval", "none", "--device", "cpu", "--no-progress"]
    two = str(pruned_dirs["2of4"])
    return {
        "steps 0": ([two, "--steps", "0"], "--steps must be a positive integer, got 0"),
        "lr 0": ([two, "--lr", "0"], "--lr must be a positive number, got 0.0"),
        "lr negative": ([two, "--lr=-1e-4"], "--lr must be a positive number, got -0.0001"),
        "sparsity-to 1": ([two, "--schedule", "cubic", "--sparsity-to", "1.0"], "--sparsity-to must be in [0, 1), got 1.0"),
        "sparsity-to negative": ([two, "--schedule", "cubic", "--sparsity-to=-0.1"], "--sparsity-to must be in [0, 1)"),
        "teacher vocabulary": ([two, "--teacher", str(other_vocab_dir)], "has another vocabulary than the student"),
        "2:4 on unstructured": ([str(pruned_dirs["u50"]), "--pattern", "2:4"], "is not 2:4"),
        "2:3 does not divide": ([two, "--schedule", "cubic", "--pattern", "2:3"], "is not a multiple of 3"),
    }, dense


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory, ptb_train_text):
    tokenizer = word_tokenizer(ptb_train_text, size=128)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("other-vocab")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_input_gives_one_line_exit_2_and_writes_nothing(pruned_dirs, other_vocab_dir, train_text, tmp_path, capsys):
    from llmprune.cli.finetune import main

    cases, common = bad_cases(pruned_dirs, other_vocab_dir)
    for label, (args, message) in cases.items():
        save, work = tmp_path / f"save-{len(label)}", tmp_path / f"work-{len(label)}"
        # argparse keeps the last value of a repeated flag: the case's flags come after the common ones
        argv = ["--model", args[0], "--dataset", train_text, *common, *args[1:], "--save", str(save),
                "--work-dir", str(work)]
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, label
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (label, err)
        assert not save.exists() and not work.exists(), label
    run = subprocess.run(cli("--model", str(pruned_dirs["2of4"]), "--steps", "0", "--save", str(tmp_path / "s")),
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == "error: --steps must be a positive integer, got 0"
    assert not (tmp_path / "s").exists()


def test_hidden_state_term_is_zero_for_the_same_states_and_a_plain_mse_otherwise():
    from llmprune.training.distill import hidden_state_loss

    a = tuple(torch.randn(2, 5, 8) for _ in range(3))
    assert float(hidden_state_loss(a, tuple(t.clone() for t in a))) == 0.0
    b = tuple(t + 0.5 for t in a)  # every entry off by 0.5: MSE 0.25 per layer
    assert float(hidden_state_loss(a, b)) == pytest.approx(0.25, rel=1e-6)
