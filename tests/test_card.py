"""adapterhub_local/card.py: every README.md we write (train, merge into a base, adapter
algebra, extract, push of an adapter and of a merged model) parses as a huggingface_hub
ModelCard with strict metadata, and carries the one tag list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_hub
from click.testing import CliRunner
from tiny import make_llama, make_peft_adapter

from adapterhub_local import card
from adapterhub_local.cli import cli

# the loopback Hub server and the models of test_hub.py, shared as fixtures
hub, hub_env, models = test_hub.hub, test_hub.hub_env, test_hub.models


def parse(path_or_text):
    from huggingface_hub import ModelCard

    text = Path(path_or_text).read_text(encoding="utf-8") if isinstance(path_or_text, Path) else path_or_text
    return ModelCard(text, ignore_metadata_errors=False)


def run(*args) -> CliRunner:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_the_tag_list():
    assert card.tags("adapter") == ["peft", "lora", "adapterhub-local"]
    assert card.tags("adapter", merged=True, base_models=["org/b"]) == [
        "peft", "lora", "adapterhub-local", "merge", "base_model:adapter:org/b"]
    assert card.tags("merged_model", merged=True, base_models=["org/b"]) == ["lora", "adapterhub-local", "merge"]


@pytest.fixture(scope="module")
def outputs(models, tmp_path_factory):
    """One output of every command that writes a card, made through the CLI."""
    root = tmp_path_factory.mktemp("cards")
    base, a = models["base"], models["support"]
    b = make_peft_adapter(base, root / "b", seed=12)
    run("merge", base, a, "--out", root / "merged")
    run("merge", a, b, "--into-adapter", "--method", "cat", "--out", root / "combo")
    run("extract", base, make_llama(root / "tuned", seed=4, max_shard_size="40KB"), "--rank", "2",
        "--out", root / "extracted")
    return root


@pytest.mark.parametrize("folder,kind,merged,relation,library", [
    ("merged", "merged_model", True, "merge", "transformers"),
    ("combo", "adapter", True, "adapter", "peft"),
    ("extracted", "adapter", True, "adapter", "peft"),
])
def test_local_cards_parse_and_share_the_tag_list(outputs, folder, kind, merged, relation, library):
    c = parse(outputs / folder / "README.md")
    assert c.data.tags == card.tags(kind, merged=merged)
    assert c.data.library_name == library and c.data.base_model_relation == relation
    assert c.data.get("base_model") is None  # the base is a local folder: no bogus Hub id in the header
    assert "## Recipe" in c.text and "```yaml" in c.text and "## Provenance" in c.text


@pytest.mark.parametrize("folder,kind,merged", [("merged", "merged_model", True), ("combo", "adapter", True)])
def test_pushed_cards_parse_and_share_the_tag_list(outputs, tmp_path, folder, kind, merged):
    res = run("push", outputs / folder, "me/x", "--dry-run", "--json", "--base-model", "org/base")
    c = parse(Path(json.loads(res.stdout)["staged_dir"]) / "README.md")
    assert c.data.tags == card.tags(kind, merged=merged, base_models=["org/base"])
    assert c.data.base_model == "org/base" and c.data.base_model_relation == ("adapter" if kind == "adapter"
                                                                              else "merge")


def test_pushed_plain_adapter_card(models):
    res = run("push", models["support"], "me/plain", "--dry-run", "--json", "--base-model", "org/base")
    c = parse(Path(json.loads(res.stdout)["staged_dir"]) / "README.md")
    assert c.data.tags == card.tags("adapter", base_models=["org/base"])


def test_train_card_parses_and_shares_the_tag_list(models, tmp_path):
    from adapterhub_local.trainer.config import TrainConfig

    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    cfg = TrainConfig(base=models["base"], data=tmp_path / "d.jsonl", out=tmp_path / "out", rank=4, alpha=8,
                      register=False)
    metrics = {"train_loss": 1.5, "steps": 4, "eval_loss": 1.25}
    c = parse(card.train_card(cfg, metrics, Path(models["base"]), 1))
    assert c.data.tags == card.tags("adapter") and c.data.library_name == "peft"
    assert c.data.base_model_relation == "adapter" and c.data.get("base_model") is None
    assert "| eval_loss | 1.25 |" in c.text and "r=4, alpha=8" in c.text and "4 steps" in c.text
    c = parse(card.train_card(cfg, metrics, Path(models["base"]), 1, base_model="TinyLlama/TinyLlama-1.1B"))
    assert c.data.base_model == "TinyLlama/TinyLlama-1.1B"
    assert "base_model:adapter:TinyLlama/TinyLlama-1.1B" in c.data.tags


def test_serving_section_has_its_place():
    text = card.adapter_card(title="t", summary="s", warnings=["w"], metrics={"m": 1.0},
                             serving="vLLM 0.x: loads as is")
    body = parse(text).text
    order = [body.index(h) for h in ("## Provenance", "## Metrics", "## Warnings", "## Serving", "## How to use")]
    assert order == sorted(order) and "## Serving\n\nvLLM 0.x: loads as is" in body
    assert "## Serving" not in parse(card.adapter_card(title="t", summary="s")).text
    with pytest.raises(ValueError, match="unknown card sections"):
        card.render_body("t", {"servng": "typo"})


HINT = "is not a Hub id: the card gets no base_model/base_model_relation and the Hub will not link it"


def test_push_dry_run_hints_once_when_the_base_is_a_local_folder(models):
    res = run("push", models["support"], "me/x", "--dry-run")
    lines = [ln for ln in res.stderr.splitlines() if HINT in ln]
    assert len(lines) == 1 and str(models["base"]) in lines[0] and "--base-model" in lines[0]
    res = run("push", models["support"], "me/x", "--dry-run", "--json")
    assert sum(HINT in ln for ln in res.stderr.splitlines()) == 1 and json.loads(res.stdout)["base_models"] == []
    res = run("push", models["support"], "me/x", "--dry-run", "--base-model", "org/base")
    assert HINT not in res.stderr


def test_push_hints_once_when_the_base_is_a_local_folder(hub_env, models):
    res = run("push", models["support"], "alice/local-base")
    assert sum(HINT in ln for ln in res.stderr.splitlines()) == 1
    c = parse(hub_env.files("alice/local-base")["README.md"].decode())
    assert c.data.get("base_model") is None and c.data.get("base_model_relation") is None
    assert c.data.tags == card.tags("adapter")


def test_push_dry_run_builds_its_card_without_the_hub_client_or_torch(models, tmp_path):
    """ModelCardData is enough for our card; ModelCard would import huggingface_hub's whole
    API client (~0.4 s), torch would cost seconds."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom adapterhub_local.cli import main\nsys.argv = ['adapters', 'push', sys.argv[1], 'me/x', "
            "'--dry-run', '--base-model', 'org/b']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'huggingface_hub.hf_api', 'transformers') if m in sys.modules),"
            " file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, str(models["support"])], capture_output=True, text=True,
                         env={**os.environ, "ADAPTERS_HOME": str(tmp_path / "home")}, timeout=120)
    assert "dry run: nothing was sent" in out.stdout, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_adapters_train_writes_the_card_with_the_one_tag_list(tmp_path):
    import test_train

    base = test_train.make_base(tmp_path / "llama")
    data = test_train.write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in test_train.SENTENCES * 4])
    run("train", base, "--data", data, "--out", tmp_path / "run", "--name", "cardtest", "--max-steps", "2",
        "--rank", "4", "--alpha", "8", "--batch-size", "2")
    c = parse(tmp_path / "run" / "README.md")
    assert c.data.tags == card.tags("adapter") and c.data.library_name == "peft"
    assert c.data.base_model_relation == "adapter" and c.data.get("base_model") is None
    assert "# cardtest" in c.text and "trained with `adapters train`" in c.text and "| train_loss |" in c.text
    # the registered version pushed: the same tag list, plus the Hub base it is given
    res = run("push", "cardtest", "me/cardtest", "--dry-run", "--json", "--base-model", "org/base")
    pushed = parse(Path(json.loads(res.stdout)["staged_dir"]) / "README.md")
    assert pushed.data.tags == card.tags("adapter", base_models=["org/base"])
