"""Push to the Hub, offline: everything up to the network call (repo ids, the token check,
the exact file list, the regenerated model card parsed back by huggingface_hub), the CLIs,
and the network function itself stopped by huggingface_hub's offline mode."""

from __future__ import annotations

import json
import logging

import pytest

import llmprune
from llmprune.checkpoints import hub
from llmprune.checkpoints.save import save_checkpoint
from llmprune.errors import UsageError



pytestmark = pytest.mark.usefixtures("one_thread")

SECRET = "hf_llmpruneTestSecret0123456789"
QUICK = dict(method="magnitude", pattern="2:4", eval="none", dense_eval=False, device="cpu", progress=False)


@pytest.fixture
def token(monkeypatch, tmp_path):
    """A fake token in HF_TOKEN, and an empty login cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return SECRET


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def uploads(monkeypatch):
    """Replace the one network function; record its arguments."""
    calls = []

    def fake_upload(folder, repo_id, files, *, private, revision, commit_message):
        calls.append(dict(folder=folder, repo_id=repo_id, files=files, private=private, revision=revision,
                          commit_message=commit_message))
        return f"https://huggingface.co/{repo_id}/commit/0123abc"

    monkeypatch.setattr(hub, "_upload", fake_upload)
    return calls


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """One pruned tiny model saved in both formats (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("hub-src")
    result = llmprune.prune(str(tiny_llama_dir), **QUICK)
    for save_format in ("dense", "compressed"):
        save_checkpoint(result.model, result.tokenizer, root / save_format, result.to_dict(), save_format=save_format)
    return root


@pytest.fixture
def folder(saved, tmp_path):
    import shutil

    return shutil.copytree(saved / "compressed", tmp_path / "ckpt")


@pytest.mark.parametrize("repo_id", ["me/model-2of4", "model", "Org_1/m.v2", "a-b/c_d-e"])
def test_valid_repo_ids(repo_id):
    assert hub.check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "/abs/path", "./rel", "-a/b", "a/b.", "a/b--c", "a b/c", "a/..",
                                     "x" * 97 + "/y", None])
def test_invalid_repo_ids(repo_id):
    with pytest.raises(UsageError) as error:
        hub.check_repo_id(repo_id)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
def test_upload_plan_is_exactly_the_checkpoint(saved, tmp_path, save_format):
    import shutil

    folder = shutil.copytree(saved / save_format, tmp_path / "ckpt")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.json").write_text("{}")
    (folder / ".hidden.json").write_text("{}")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("private notes")
    (folder / "scratch.log").write_text("log")
    weights = (["model.safetensors"] if save_format == "dense"
               else ["llmprune-compressed-00001-of-00001.safetensors", "llmprune-compressed.safetensors.index.json"])
    assert hub.upload_plan(folder) == sorted(["README.md", "config.json", "generation_config.json", "llmprune.json",
                                              "tokenizer.json", "tokenizer_config.json", *weights])


def test_upload_plan_refuses_incomplete_or_unsafe_folders(folder, tmp_path):
    (folder / "extra.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UsageError, match="pickle"):
        hub.upload_plan(folder)
    (folder / "extra.bin").unlink()
    shard = folder / "llmprune-compressed-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UsageError, match="truncated"):
        hub.upload_plan(folder)
    with pytest.raises(UsageError, match="not an llmprune checkpoint"):
        hub.upload_plan(tmp_path)  # no llmprune.json
    with pytest.raises(UsageError, match="is not a folder"):
        hub.upload_plan(tmp_path / "missing")


def test_push_uploads_the_plan_with_a_card_for_the_repo(folder, token, uploads):
    from huggingface_hub import ModelCard

    url = llmprune.push_to_hub(folder, "me/tiny-2of4", private=True, revision="experiments",
                               commit_message="first sparse upload")
    assert url == "https://huggingface.co/me/tiny-2of4/commit/0123abc"
    (call,) = uploads
    assert call == dict(folder=str(folder), repo_id="me/tiny-2of4", files=hub.upload_plan(folder), private=True,
                        revision="experiments", commit_message="first sparse upload")
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "llmprune" and data["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "magnitude", "2:4", "llmprune-compressed"} <= set(data["tags"])
    assert data["model_name"] == "tiny-2of4"
    assert 'llmprune.load("me/tiny-2of4")' in card.text and "path/to/" not in card.text


def test_push_default_commit_message_and_main(folder, token, uploads):
    hub.push_to_hub(folder, "me/tiny")
    assert uploads[0]["revision"] is None and uploads[0]["private"] is False
    assert "llmprune" in uploads[0]["commit_message"]


def test_hand_written_card_is_kept(folder, token, uploads):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\nMy own card.\n")
    hub.push_to_hub(folder, "me/tiny")
    assert (folder / "README.md").read_text() == "---\nlicense: mit\n---\n\nMy own card.\n"


def test_no_token_fails_before_anything(folder, no_token, uploads):
    before = (folder / "README.md").read_text()
    with pytest.raises(UsageError, match="no Hugging Face token found: set HF_TOKEN or run `hf auth login`"):
        hub.push_to_hub(folder, "me/tiny")
    assert uploads == [] and (folder / "README.md").read_text() == before


def test_the_network_call_is_blocked_offline_and_never_shows_the_token(folder, token, caplog, capsys, monkeypatch):
    """The real ``_upload`` runs up to huggingface_hub's HTTP layer, which offline mode stops."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(UsageError) as error:
        hub.push_to_hub(folder, "me/tiny", private=True)
    message = str(error.value)
    assert message.startswith("push to 'me/tiny' failed: OfflineModeIsEnabled") and "\n" not in message
    captured = capsys.readouterr()
    for text in (message, caplog.text, captured.out, captured.err, (folder / "README.md").read_text(),
                 (folder / "llmprune.json").read_text()):
        assert SECRET not in text


def test_push_cli(folder, token, uploads, capsys):
    from llmprune.cli.push import main

    assert main([str(folder), "me/tiny", "--private", "--revision", "v1", "--commit-message", "hello"]) == 0
    assert uploads[0]["private"] is True and uploads[0]["revision"] == "v1" and uploads[0]["commit_message"] == "hello"
    assert "pushed" in capsys.readouterr().out
    for argv, needle in [([str(folder), "a/b/c"], "invalid Hub repo id 'a/b/c'"),
                         ([str(folder / "nope"), "me/tiny"], "is not a folder")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert len(uploads) == 1


def test_pipeline_pushes_after_saving(tiny_llama_dir, tmp_path, token, uploads):
    out = tmp_path / "ckpt"
    llmprune.prune(str(tiny_llama_dir), **QUICK, save=str(out), save_format="compressed", push_to_hub="me/tiny-run",
                   private=True, hub_revision="v2", commit_message="from the pipeline")
    (call,) = uploads
    assert call["folder"] == str(out) and call["repo_id"] == "me/tiny-run" and call["revision"] == "v2"
    assert call["private"] is True and call["commit_message"] == "from the pipeline"
    assert "llmprune-compressed.safetensors.index.json" in call["files"]
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["recipe"]["config"]["push_to_hub"] == "me/tiny-run"
    assert 'llmprune.load("me/tiny-run")' in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(push_to_hub="a/b/c"), "invalid Hub repo id 'a/b/c'"),
        (dict(push_to_hub="me/x", save=None), "--push-to-hub needs --save"),
        (dict(private=True), "--private only applies with --push-to-hub"),
        (dict(hub_revision="v1"), "--hub-revision only applies with --push-to-hub"),
        (dict(commit_message="m"), "--commit-message only applies with --push-to-hub"),
    ],
    ids=["bad-repo", "no-save", "private-alone", "revision-alone", "message-alone"],
)
def test_pipeline_validates_push_options_before_work(tiny_llama_dir, tmp_path, token, uploads, options, message):
    kwargs = {**QUICK, "save": str(tmp_path / "never"), **options}
    with pytest.raises(UsageError, match=message):
        llmprune.prune(str(tiny_llama_dir), **kwargs)
    assert list(tmp_path.iterdir()) == []
    assert uploads == []


def test_pipeline_without_token_fails_before_work(tiny_llama_dir, tmp_path, no_token, uploads):
    with pytest.raises(UsageError, match="no Hugging Face token"):
        llmprune.prune(str(tiny_llama_dir), **QUICK, save=str(tmp_path / "never"), push_to_hub="me/x")
    assert not (tmp_path / "never").exists() and uploads == []


def test_cli_has_the_push_flags():
    from llmprune.cli.oneshot import build_parser

    args = build_parser("magnitude").parse_args(
        ["--model", "m", "--push-to-hub", "me/x", "--private", "--hub-revision", "v1", "--commit-message", "msg",
         "--save-format", "compressed", "--revision", "base-rev"]
    )
    assert (args.push_to_hub, args.private, args.hub_revision, args.commit_message, args.save_format, args.revision) == (
        "me/x", True, "v1", "msg", "compressed", "base-rev")


def test_model_card_names_hub_datasets():
    from huggingface_hub import ModelCard

    from llmprune.checkpoints.modelcard import render_card

    meta = {
        "format": "llmprune-dense",
        "recipe": {"method": "sparsegpt", "pattern": {"kind": "unstructured", "sparsity": 0.5},
                   "calibration": {"source": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0,
                                   "token_ids_sha256": "ab" * 32}},
        "results": {"sparsity": 0.5, "dense_ppl": {"wikitext2": {"ppl": 5.47, "seqlen": 2048, "n_tokens": 100, "n_windows": 1}},
                    "pruned_ppl": {"wikitext2": {"ppl": 7.22, "seqlen": 2048, "n_tokens": 100, "n_windows": 1}}},
        "base_model": {"source": "meta-llama/Llama-2-7b-hf", "kind": "hub", "hub_id": "meta-llama/Llama-2-7b-hf",
                       "license": "llama2"},
        "versions": {"llmprune": "0.1.0"},
    }
    card = ModelCard(render_card(meta, name="llama2-7b-50"))
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Llama-2-7b-hf" and data["license"] == "llama2"
    assert data["library_name"] == "transformers" and "unstructured-sparsity" in data["tags"]
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_config, result.metric_value) == ("wikitext", "wikitext-2-raw-v1", 7.22)
    assert "AutoModelForCausalLM.from_pretrained(\"meta-llama/Llama-2-7b-hf\")" not in card.text
    assert "| wikitext2 | 5.470 | 7.220 | 100 | 2048 |" in card.text
