"""``--recipe``: named combinations of the one-shot options (``llmprune.oneshot.recipes``)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from llmprune.config import PruneConfig
from llmprune.errors import UsageError
from llmprune.oneshot import recipes
from llmprune.oneshot.recipes import RECIPES, Rule, recipe_options

FIELDS = {f.name: f for f in dataclasses.fields(PruneConfig)}


@pytest.fixture
def toy_recipe(monkeypatch):
    rules = [Rule("wanda", False, {"layer_ratios": "owl", "update": "exact"}, min_sparsity=0.6),
             Rule("wanda", False, {"score": "ria"}),
             Rule("wanda", True, {"refine": "dsnot"})]
    monkeypatch.setitem(recipes.RECIPES, "best", rules)
    return rules


def test_first_matching_rule_by_pattern_kind_and_sparsity(toy_recipe):
    assert recipe_options("best", "wanda", "unstructured", 0.7) == {"layer_ratios": "owl", "update": "exact"}
    assert recipe_options("best", "wanda", "unstructured", 0.5) == {"score": "ria"}
    assert recipe_options("best", "wanda", "2:4", None) == {"refine": "dsnot"}
    assert recipe_options("none", "wanda", "2:4", None) == {}


def test_config_fills_defaults_and_keeps_explicit_values(toy_recipe):
    config = PruneConfig(model="m", method="wanda", sparsity=0.7, recipe="best")
    assert (config.layer_ratios, config.update, config.score) == ("owl", "exact", "default")
    # a field set to a non-default value keeps it (a default value cannot be told from "not set")
    kept = PruneConfig(model="m", method="wanda", sparsity=0.7, recipe="best", update="exact", refine="dsnot")
    assert (kept.layer_ratios, kept.update, kept.refine) == ("owl", "exact", "dsnot")
    mine = PruneConfig(model="m", method="wanda", sparsity=0.5, recipe="best", score="default", refine="dsnot")
    assert (mine.score, mine.refine) == ("ria", "dsnot")
    # the config saved in a checkpoint reads back to the same values (resolution is idempotent)
    assert PruneConfig.from_dict(config.to_dict()) == config


def test_unknown_recipe_and_method_without_rules_are_usage_errors(toy_recipe):
    with pytest.raises(UsageError, match=r"--recipe must be one of none, best, got 'fast'"):
        PruneConfig(model="m", method="wanda", sparsity=0.5, recipe="fast")
    with pytest.raises(UsageError, match=r"--recipe best is defined for wanda .* not 'magnitude'"):
        PruneConfig(model="m", method="magnitude", sparsity=0.5, recipe="best")


def test_best_covers_both_methods_and_both_pattern_kinds_with_valid_options():
    """The shipped recipe: every rule names real fields with values their configs accept, and
    sparsegpt and wanda both have a rule for unstructured and for N:M sparsity."""
    rules = RECIPES["best"]
    for method in ("sparsegpt", "wanda"):
        for nm in (False, True):
            assert any(r.method == method and r.nm == nm and r.min_sparsity == 0.0 for r in rules), (method, nm)
    for rule in rules:
        assert rule.evidence, rule
        assert set(rule.options) <= set(FIELDS), rule
        pattern = (rule.only_pattern or "4:8") if rule.nm else "unstructured"
        sparsity = None if rule.nm else max(rule.min_sparsity, 0.5)
        config = PruneConfig(model="m", method=rule.method, pattern=pattern, sparsity=sparsity, recipe="best")
        config.refinements.check_method(rule.method)  # UsageError for a combination the method refuses
        config.owl  # noqa: B018 - UsageError for bad --owl-* values
        for name, value in rule.options.items():
            assert getattr(config, name) == value


def test_best_picks_the_permutation_for_wanda_at_2_4_only():
    # The table measured --permute-channels worth it for Wanda at 2:4 (0.890x vs 0.910x), not at
    # 4:8 (0.922x vs 0.921x for 1.5x the time) nor for SparseGPT once the exact update runs.
    assert recipe_options("best", "wanda", "2:4", None) == {"update": "exact", "permute_channels": True}
    assert recipe_options("best", "wanda", "4:8", None) == {"update": "exact"}
    assert recipe_options("best", "sparsegpt", "2:4", None) == {"update": "exact"}
    assert recipe_options("best", "sparsegpt", "unstructured", 0.7) == {"layer_ratios": "owl", "refine": "dsnot",
                                                                          "update": "exact"}


def test_cli_recipe_best_on_magnitude_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmprune.magnitude", "--model", "smollm2-135m", "--sparsity", "0.5",
                           "--recipe", "best", "--save", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--recipe best is defined for" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_is_recorded_in_the_results(tiny_llama_dir, ptb_train_text, tmp_path, one_thread):
    from llmprune.pipeline import prune

    results, calib = tmp_path / "r.json", tmp_path / "calib.txt"
    calib.write_text(ptb_train_text[:60_000])
    prune(str(tiny_llama_dir), method="wanda", pattern="2:4", dataset=str(calib), nsamples=4, seqlen=32,
          eval="none", dense_eval=False, device="cpu", progress=False, recipe="best", results=str(results))
    recipe = json.loads(results.read_text())["recipe"]
    expected = recipe_options("best", "wanda", "2:4", None)
    assert recipe["named_recipe"] == {"name": "best", "options": expected}
    for name, value in expected.items():
        assert recipe["config"][name] == value
