"""`adapters demo --quick` end to end, checking that the numbers it prints agree."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from adapterhub_local.cli import cli, main


def _table(output: str, first_header: str) -> list[list[str]]:
    """Rows of the first aligned table whose header line starts with ``first_header``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith(("check:", "$ ", "# ", "===", "plot ")):
            break
        rows.append(line.split())
    return rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("ADAPTERS_CACHE", str(root / "cache"))
    mp.setenv("ADAPTERS_PROGRESS", "0")
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        result = CliRunner().invoke(cli, ["demo", "--quick", "--workdir", str(root / "wd")],
                                    catch_exceptions=False)
    finally:
        mp.undo()
    return root / "wd", result


def test_demo_runs_the_whole_story(demo_run):
    wd, result = demo_run
    out = result.output
    assert result.exit_code == 0, out[-3000:]
    for verb in ("fingerprint", "train", "list", "alias", "show", "stack", "interpolate", "merge",
                 "eval", "log-metric", "sweep", "verify"):
        assert f"$ adapters {verb} " in out or f"$ adapters {verb}\n" in out, verb
    if "push" in cli.commands:
        assert "$ adapters push " in out and (wd / "push-dry-run" / "README.md").is_file()
        assert f"push dry run:    {wd / 'push-dry-run'}" in out
    # ends with the paths a user explores next
    assert f"registry:        {wd / 'registry'}" in out
    for png in ("sweep.png", "training.png"):
        path = wd / "plots" / png
        assert path.read_bytes()[:4] == b"\x89PNG" and str(path) in out
    assert "FAILED" not in out and "skipped" not in out.split("done in")[0].split("=== 1.")[1]


def test_demo_printed_numbers_are_consistent(demo_run):
    wd, result = demo_run
    rows = {r[0]: r for r in _table(result.output, "MODEL ")}
    header = next(line for line in result.output.splitlines() if line.startswith("MODEL "))
    domains = [w.lower() for w in re.findall(r"(\w+) LOSS", header)]
    assert domains == ["arithmetic", "recipes", "code"]
    loss = {m: dict(zip(domains, map(float, r[2:5]))) for m, r in rows.items()}
    # each adapter beats the base on its own domain
    for d in domains:
        assert loss[d][d] < loss["$BASE"][d]
    # the merged model equals the stacked adapters applied in memory (as printed, 4 decimals)
    assert loss["merged/all-three"] == loss["stack-all"]
    # the sweep's endpoints are the adapters themselves
    sweep = _table(result.output, "T ")
    assert float(sweep[0][1]) == loss["arithmetic"]["arithmetic"]
    assert float(sweep[-1][2]) == loss["recipes"]["recipes"]
    # the registry, queried by the logged cross-domain losses, finds the recipes adapter
    beat = _table(result.output.split("$ adapters list --where")[1].split("\n", 1)[1], "NAME ")
    assert "recipes" in [r[0] for r in beat] and "code" not in [r[0] for r in beat]
    summary = json.loads((wd / "demo-summary.json").read_text())
    assert summary["checks"] and all(c["ok"] for c in summary["checks"])
    assert not summary["failed"]
    info = summary["base_info"]
    assert info["pretrained_loss"] < 0.5 * info["random_init_loss"]


def test_demo_registry_is_usable_afterwards(demo_run):
    wd, _ = demo_run
    r = CliRunner().invoke(cli, ["--registry", str(wd / "registry"), "list", "--json"],
                           catch_exceptions=False)
    names = {row["name"] for row in json.loads(r.output)}
    assert {"arithmetic", "recipes", "code", "stack-all"} <= names


def test_demo_refuses_a_used_workdir(tmp_path, capsys):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--workdir", str(tmp_path / "wd")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "wd" / "keep.txt").read_text() == "mine"


def test_missing_verb_is_skipped_with_a_note(tmp_path):
    from adapterhub_local.demo.story import QUICK, Story

    lines = []
    story = Story(workdir=tmp_path, base=tmp_path, sizes=QUICK, out=lines.append)
    story.heading("a step")
    assert story.run(["no-such-verb", "x"]) is False
    assert lines[-1] == "step 1 skipped: `adapters no-such-verb` not available yet"
    assert story.summary["skipped"] == [lines[-1]]


def test_plots_without_matplotlib(monkeypatch, tmp_path):
    from adapterhub_local.eval import plots
    from adapterhub_local.eval.interpolation import SweepResult

    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    res = SweepResult("a", "b", "base", "da", "db", "da", "db", 2.0, 2.0,
                      rows=[{"t": 0.0, "loss_a": 1.0, "loss_b": 2.0, "mean": 1.5}])
    assert plots.plot_sweep(res, tmp_path / "s.png") is None
    assert plots.plot_training({}, tmp_path / "t.png") is None
    assert not list(tmp_path.iterdir())


def test_training_curves_from_a_metrics_log(tmp_path):
    from adapterhub_local.eval import plots

    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7},
        {"step": 3, "loss": "nan?"}, {"no_step": 1, "loss": 1.0}]) + "\nnot json\n")
    c = plots.curves(plots.read_metrics_log(log))
    assert c == {"loss": [(1.0, 3.0), (2.0, 2.5)], "eval_loss": [(2.0, 2.7)]}
    out = plots.plot_training({"x": log}, tmp_path / "t.png")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"


def test_a_crashing_verb_fails_its_step_not_the_story(tmp_path, monkeypatch):
    import click as _click

    from adapterhub_local.demo.story import QUICK, Story

    @_click.command("boom")
    def boom():
        raise KeyError("oops")

    monkeypatch.setitem(cli.commands, "boom", boom)
    lines = []
    story = Story(workdir=tmp_path, base=tmp_path, sizes=QUICK, out=lines.append, cli=cli)
    story.heading("a step")
    assert story.run(["boom"]) is False
    assert lines[-1].startswith("error: internal error KeyError") and "--debug" in lines[-1]
    expected = ("step 1 failed: adapters boom: internal error KeyError: 'oops' "
                "(run `adapters --debug demo` for the traceback)")
    assert story.summary["failed"] == [expected]


def test_demo_base_must_be_a_model_with_a_tokenizer(tmp_path, capsys, llama_dir):
    for base, needle in ((tmp_path, "not a model folder"), (llama_dir, "has no tokenizer files")):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--base", str(base), "--workdir", str(tmp_path / f"wd-{needle[:3]}")])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / f"wd-{needle[:3]}").exists()  # nothing created for a bad call


def test_base_cache_hit_and_a_concurrent_builder(tmp_path, monkeypatch):
    from dataclasses import replace

    from adapterhub_local.demo import base as demo_base

    monkeypatch.setenv("ADAPTERS_CACHE", str(tmp_path / "cache"))
    spec = replace(demo_base.QUICK, name="t", steps=3, n_texts=200, hidden=16, intermediate=32)
    first, info, cached = demo_base.ensure_base(spec, log=lambda m: None)
    assert not cached and info["pretrained_loss"] < info["random_init_loss"]
    again, info2, cached2 = demo_base.ensure_base(spec, log=lambda m: None)
    assert cached2 and again == first and info2 == info
    # a second builder finishing late keeps the first one's folder untouched
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    logs = []
    assert demo_base.build_base(first, spec, log=logs.append) == info
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert "another run cached the demo base first" in logs[-1]
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging leftovers


def test_corpus_is_deterministic_and_domains_differ():
    from adapterhub_local.demo import corpus

    assert corpus.generate("recipes", 5, seed=7) == corpus.generate("recipes", 5, seed=7)
    vocab = set(corpus.vocabulary())
    for domain in ["general", *corpus.DOMAINS]:
        assert all(set(t.split()) <= vocab for t in corpus.generate(domain, 200, seed=99))
    words = {d: set(" ".join(corpus.generate(d, 200, 0)).split()) for d in corpus.DOMAINS}
    assert len(words["arithmetic"] & words["code"]) < 0.5 * len(words["code"])
    assert corpus.number_words(123) == "one hundred twenty three"
