"""Zero-shot tasks through lm-evaluation-harness: the shipped offline tasks end to end on tiny
models, a model trained on the answers beating a random one, the results JSON / llmprune.json /
model card, and the one-line errors before any pruning."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer

import llmprune
from llmprune.evaluation import zeroshot

pytest.importorskip("lm_eval")  # the eval extra; scripts/install.sh installs it, so CI runs these

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="ptb", eval="ptb", nsamples=4, seqlen=32, max_eval_tokens=512, device="cpu", progress=False)


def shipped_docs(name: str, n: int) -> list[dict]:
    lines = (zeroshot.TASKS_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_shipped_tasks_are_what_the_build_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_offline_tasks", ROOT / "scripts" / "build_offline_tasks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.build(tmp_path)
    for name in counts:
        assert (tmp_path / name).read_bytes() == (zeroshot.TASKS_DIR / name).read_bytes(), name
    for name in ("offline.yaml", "offline_wiki_cloze.yaml", "offline_ptb_nextsent.yaml"):
        assert (tmp_path / name).read_text() == (zeroshot.TASKS_DIR / name).read_text(), name
    # Held-out text only: every cloze passage comes from a wiki-summaries test article, every
    # next-sentence context and answer are PTB test lines.
    from llmprune.calibration.data import treebank_rows, wiki_summaries_texts

    test_articles = wiki_summaries_texts("test")
    for doc in shipped_docs("wiki_cloze_test.jsonl", 20):
        assert any(text.startswith(doc["context"] + " " + doc["target"]) for text in test_articles)
    ptb_test = set(treebank_rows("test"))
    for doc in shipped_docs("ptb_nextsent_test.jsonl", 20):
        assert all(line in ptb_test for line in doc["context"].split("\n")) and doc["choices"][doc["label"]] in ptb_test
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
    assert zeroshot.offline_task_names() == ["offline", "offline_wiki_cloze", "offline_ptb_nextsent"]


def tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def train_on(model, tokenizer, texts: list[str], steps: int) -> None:
    """Full-batch AdamW on ``texts`` (padding masked out of the loss)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_model_trained_on_the_answers_beats_a_random_one(one_thread):
    limit = 12
    cloze, nextsent = shipped_docs("wiki_cloze_test.jsonl", limit), shipped_docs("ptb_nextsent_test.jsonl", limit)
    answers = [d["context"] + " " + d["target"] for d in cloze] + [d["context"] + "\n" + d["choices"][d["label"]]
                                                                    for d in nextsent]
    every_word = "\n".join(answers + [c for d in nextsent for c in d["choices"]])
    tokenizer = word_tokenizer(every_word, size=10_000)  # every word of these documents: no <unk>
    tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer(every_word).input_ids
    assert ids.count(tokenizer.unk_token_id) == every_word.split().count("<unk>")  # only PTB's own <unk> words

    tasks = zeroshot.prepare_tasks(zeroshot.ZeroShotOptions(eval_tasks="offline", eval_tasks_limit=limit,
                                                            eval_batch_size=4))
    model = tiny_model(len(tokenizer))
    random_scores = {r["task"]: r for r in zeroshot.accuracy_rows(zeroshot.evaluate_tasks(model, tokenizer, tasks))}
    train_on(model, tokenizer, answers, steps=60)
    summary = zeroshot.evaluate_tasks(model, tokenizer, tasks)
    trained = {r["task"]: r for r in zeroshot.accuracy_rows(summary)}

    assert summary["n-samples"]["offline_wiki_cloze"] == {"original": 152, "effective": limit}
    import lm_eval

    assert summary["versions"]["offline_ptb_nextsent"] == 1.0 and summary["lm_eval_version"] == lm_eval.__version__
    # A random model almost never produces the exact word greedily and picks 1 of 4 at chance.
    assert random_scores["offline_wiki_cloze"]["acc"] <= 2 / limit
    assert trained["offline_wiki_cloze"]["acc"] >= 0.75
    assert trained["offline_ptb_nextsent"]["acc"] >= 0.75 and trained["offline_ptb_nextsent"]["acc_norm"] >= 0.75
    for task in ("offline_wiki_cloze", "offline_ptb_nextsent", "offline"):
        assert trained[task]["acc"] > random_scores[task]["acc"], task
    # The group is the unweighted mean of its two tasks.
    assert trained["offline"]["acc"] == pytest.approx((trained["offline_wiki_cloze"]["acc"]
                                                       + trained["offline_ptb_nextsent"]["acc"]) / 2)


def test_cli_writes_task_accuracy_to_results_checkpoint_and_model_card(tiny_llama_dir, tmp_path):
    from huggingface_hub import ModelCard

    out, results = tmp_path / "pruned", tmp_path / "results.json"
    # One thread: on the busy 2-core machine lm-eval's many small forwards with 2 threads made
    # this run take over 600 s instead of ~40 s (thread oversubscription; see conftest.one_thread).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune.wanda", "--model", str(tiny_llama_dir), "--pattern", "2:4", "--dataset", "ptb",
         "--eval", "ptb", "--nsamples", "4", "--seqlen", "32", "--max-eval-tokens", "512", "--device", "cpu",
         "--eval-tasks", "offline", "--eval-tasks-limit", "5", "--eval-batch-size", "2", "--save", str(out),
         "--results", str(results), "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for row in ("dense offline_wiki_cloze", "pruned offline_ptb_nextsent", "pruned offline "):
        assert row in proc.stdout, proc.stdout

    data = json.loads(results.read_text())["results"]
    for label in ("dense_zeroshot", "pruned_zeroshot"):
        summary = data[label]
        assert summary["tasks"] == ["offline"] and summary["limit"] == 5 and summary["num_fewshot"] == 0
        nextsent = summary["results"]["offline_ptb_nextsent"]
        for key in ("acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"):
            assert 0.0 <= nextsent[key] <= 1.0, (label, key)
        assert nextsent["acc,none"] * 5 == pytest.approx(round(nextsent["acc,none"] * 5))  # k of 5 documents
        assert set(summary["versions"]) == {"offline", "offline_wiki_cloze", "offline_ptb_nextsent"}
        assert summary["n-samples"]["offline_ptb_nextsent"]["effective"] == 5

    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["results"]["pruned_zeroshot"] == data["pruned_zeroshot"]
    config = llmprune.PruneConfig.from_dict(meta["recipe"]["config"])
    assert (config.eval_tasks, config.eval_tasks_limit, config.eval_batch_size) == ("offline", 5, 2)

    card = ModelCard.load(out / "README.md")
    found = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    pruned = data["pruned_zeroshot"]["results"]
    assert found[("offline_ptb_nextsent", "acc")] == round(pruned["offline_ptb_nextsent"]["acc,none"], 4)
    assert found[("offline_ptb_nextsent", "acc_norm")] == round(pruned["offline_ptb_nextsent"]["acc_norm,none"], 4)
    assert found[("offline_wiki_cloze", "acc")] == round(pruned["offline_wiki_cloze"]["acc,none"], 4)
    assert ("offline_wiki_cloze", "acc_norm") not in found  # a cloze has no normalised accuracy
    assert ("ptb_text_only", "perplexity") in found  # beside the perplexity
    assert "| offline_ptb_nextsent | 1.0 |" in card.text


def test_finetune_scores_tasks_before_and_after_into_checkpoint_and_card(tiny_llama_dir, tmp_path, monkeypatch,
                                                                        one_thread):
    from huggingface_hub import ModelCard

    from llmprune.cli.finetune import format_table

    result = llmprune.finetune(str(tiny_llama_dir), teacher="none", dataset="ptb", steps=2, seqlen=32, batch_size=2,
                               lr=1e-3, eval="none", device="cpu", progress=False, eval_tasks="offline_wiki_cloze",
                               eval_tasks_limit=4, save=str(tmp_path / "ft"))
    for summary in (result.before_zeroshot, result.after_zeroshot):
        assert summary["tasks"] == ["offline_wiki_cloze"] and summary["limit"] == 4
        assert 0.0 <= summary["results"]["offline_wiki_cloze"]["acc,none"] <= 1.0
    assert "after offline_wiki_cloze" in format_table(result) and "before offline_wiki_cloze" in format_table(result)
    meta = json.loads((tmp_path / "ft" / "llmprune.json").read_text())
    assert meta["results"]["pruned_zeroshot"] == result.after_zeroshot
    assert meta["results"]["before_finetune_zeroshot"] == result.before_zeroshot
    card = ModelCard.load(tmp_path / "ft" / "README.md")
    found = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("offline_wiki_cloze", "acc")] == round(result.after_zeroshot["results"]["offline_wiki_cloze"]["acc,none"], 4)
    # a bad task name fails before the model is loaded, and nothing is written
    import llmprune.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded before the task check"))
    with pytest.raises(llmprune.UsageError, match="no_such_task"):
        llmprune.finetune(str(tiny_llama_dir), dataset="ptb", steps=2, eval_tasks="no_such_task",
                          save=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_no_dense_eval_and_few_shot_pass_through(tiny_llama_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pad_before = tokenizer.pad_token
    result = llmprune.prune(str(tiny_llama_dir), loaded_model=model, tokenizer=tokenizer, method="magnitude",
                            sparsity=0.5, eval_tasks="offline_ptb_nextsent", eval_tasks_limit=3, num_fewshot=2,
                            dense_eval=False, **TINY)
    assert result.dense_zeroshot == {} and result.dense_ppl == {}
    summary = result.pruned_zeroshot
    assert summary["n-shot"] == {"offline_ptb_nextsent": 2} and summary["num_fewshot"] == 2
    assert summary["n-samples"]["offline_ptb_nextsent"]["effective"] == 3
    assert list(summary["results"]) == ["offline_ptb_nextsent"]
    assert tokenizer.pad_token == pad_before  # lm-eval set a pad token on its own copy only
    assert "eval_tasks_pruned" in result.seconds


def _unreachable_hub(monkeypatch):
    from llmprune.calibration import data

    monkeypatch.setattr(data, "_hub_offline", lambda: False)
    monkeypatch.setattr(data, "_hub_reachable", lambda repo_id: False)


@pytest.mark.parametrize(
    "tasks, extra, setup, expected",
    [
        ("offline,not_a_task", [], None, "unknown task 'not_a_task'"),
        ("offline,,", [], None, "is not valid: use comma-separated task names"),
        ("offline", ["--eval-tasks-limit", "0"], None, "--eval-tasks-limit must be a positive integer, got 0"),
        ("offline", ["--num-fewshot", "-1"], None, "--num-fewshot=-1 is not valid"),
        ("offline", ["--offload", "disk"], None, "--offload disk"),
        ("offline", [], "no_lm_eval", "pip install llmprune[eval]"),
        ("boolq", [], "unreachable", "task 'boolq' reads the Hub dataset 'aps/super_glue'"),
        ("boolq", [], None, "not in the local datasets cache"),  # conftest: offline mode, empty cache
    ],
    ids=["unknown", "empty-name", "limit", "fewshot", "disk", "lm-eval-missing", "hub-unreachable", "not-cached"],
)
def test_bad_eval_tasks_fail_in_one_line_before_pruning(tiny_llama_dir, tmp_path, monkeypatch, capsys,
                                                        tasks, extra, setup, expected):
    from llmprune.cli.oneshot import main
    from llmprune.models import loader

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the --eval-tasks check")

    monkeypatch.setattr(loader, "load_model", never)
    monkeypatch.setattr(loader, "load_skeleton_model", never)
    if setup == "no_lm_eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    elif setup == "unreachable":
        _unreachable_hub(monkeypatch)
    out, results = tmp_path / "pruned", tmp_path / "results.json"
    code = main("sparsegpt", ["--model", str(tiny_llama_dir), "--pattern", "2:4", "--eval-tasks", tasks, *extra,
                              "--save", str(out), "--results", str(results), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists() and not results.exists()


def test_structured_scores_tasks_on_the_dense_and_the_smaller_model(tiny_llama_dir, tmp_path, one_thread):
    from huggingface_hub import ModelCard

    from llmprune.cli.structured import format_table
    from llmprune.structured import prune as structured_prune

    result = structured_prune(str(tiny_llama_dir), ffn_ratio=0.25, dataset="ptb", nsamples=4, seqlen=32, eval="none",
                              device="cpu", progress=False, eval_tasks="offline_wiki_cloze", eval_tasks_limit=4,
                              save=str(tmp_path / "small"))
    for summary in (result.dense_zeroshot, result.pruned_zeroshot):
        assert summary["tasks"] == ["offline_wiki_cloze"] and summary["limit"] == 4
        assert 0.0 <= summary["results"]["offline_wiki_cloze"]["acc,none"] <= 1.0
    assert "pruned offline_wiki_cloze" in format_table(result) and "dense offline_wiki_cloze" in format_table(result)
    meta = json.loads((tmp_path / "small" / "llmprune.json").read_text())
    assert meta["results"]["pruned_zeroshot"] == result.pruned_zeroshot
    card = ModelCard.load(tmp_path / "small" / "README.md")
    found = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("offline_wiki_cloze", "acc")] == round(result.pruned_zeroshot["results"]["offline_wiki_cloze"]["acc,none"], 4)
    with pytest.raises(llmprune.UsageError, match="no_such_task"):
        structured_prune(str(tiny_llama_dir), ffn_ratio=0.25, dataset="ptb", eval_tasks="no_such_task",
                         save=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
