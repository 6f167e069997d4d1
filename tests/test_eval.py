"""`adapters eval` / `adapters sweep` (adapterhub_local.eval), checked against independent
computations (PEFT's own model, PEFT's merge_and_unload, per-example losses)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from adapterhub_local.trainer.data import read_jsonl, tokenize
from click.testing import CliRunner
from tiny import load_model, make_gpt2, make_llama, make_peft_adapter

from adapterhub_local.cli import cli, main
from adapterhub_local.demo.base import make_tokenizer
from adapterhub_local.eval.apply import applied
from adapterhub_local.eval.evaluate import Evaluator, eval_loss, evaluate_refs
from adapterhub_local.peft_format import load_adapter


def encode(tokenizer, records, seq_len=512):
    """(ids, labels) per record, through the trainer's tokenization (the one eval uses)."""
    lines = [(i, r, "messages" if "messages" in r else "prompt_completion" if "prompt" in r
              else "text") for i, r in enumerate(records, 1)]
    return [(e.ids, e.labels) for e in tokenize(lines, tokenizer, seq_len)[0]]

WORDS = [f"w{i}" for i in range(60)]  # + 4 specials = the tiny models' vocab of 64


def _write_data(path, seed, n=12, pattern=None):
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = pattern(rng) if pattern else [rng.choice(WORDS) for _ in range(rng.randint(3, 15))]
        lines.append(json.dumps({"text": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-eval")
    base = make_llama(root / "base", seed=3)
    make_tokenizer(base, WORDS)
    a = make_peft_adapter(base, root / "a", seed=1, target_modules=["q_proj", "v_proj", "down_proj"])
    b = make_peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "o_proj", "gate_proj"])
    da = _write_data(root / "da.eval.jsonl", 1)
    db = _write_data(root / "db.eval.jsonl", 2, pattern=lambda r: ["w1", "w2", r.choice(WORDS)] * 3)
    return {"root": root, "base": base, "a": a, "b": b, "da": da, "db": db}


def _peft_model(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), str(adapter)).eval()


def _reference_loss(model, tokenizer, path):
    """Per example with the model's own labels= loss, token-weighted: an independent sum."""
    total, count = 0.0, 0
    for _, rec, _ in read_jsonl(path):
        ids = tokenizer(rec["text"])["input_ids"] + [tokenizer.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = float(model(input_ids=x, labels=x).loss)
        total += loss * (len(ids) - 1)
        count += len(ids) - 1
    return total / count


def test_applied_matches_peft_logits(world):
    model = load_model(world["base"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for name in ("a", "b"):
        with applied(model, [(load_adapter(world[name]), 1.0)]):
            ours = model(input_ids=x).logits
        ref = _peft_model(world["base"], world[name])(input_ids=x).logits
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights restored on exit"


def test_applied_gpt2_conv1d_and_embedding(tmp_path):
    base = make_gpt2(tmp_path / "g")
    ad = make_peft_adapter(base, tmp_path / "ga", target_modules=["c_attn", "wte"], fan_in_fan_out=True)
    model = load_model(base)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with applied(model, [(load_adapter(ad), 1.0)]):
        ours = model(input_ids=x).logits
    ref = _peft_model(base, ad)(input_ids=x).logits
    assert torch.allclose(ours, ref, atol=1e-5)
    # GPT-2 ties lm_head to wte: the adapter's embedding LoRA must not leak into lm_head
    assert model.lm_head.weight is model.transformer.wte.weight


def test_eval_loss_equals_independent_sum(world):
    model = load_model(world["base"])
    ev = Evaluator(batch_size=5)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    ours = ev.run(model, tok, world["da"]).loss
    assert ours == pytest.approx(_reference_loss(model, tok, world["da"]), rel=1e-5)
    # batch size does not change the number
    assert Evaluator(batch_size=1).run(model, tok, world["da"]).loss == pytest.approx(ours, rel=1e-5)


def test_prompt_completion_masks_prompt(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    (ids, labels), = encode(tok, [{"prompt": "w1 w2 w3", "completion": "w4 w5"}])
    assert ids == [tok.bos_token_id, 5, 6, 7, 8, 9, tok.eos_token_id]
    assert labels == [-100, -100, -100, -100, 8, 9, tok.eos_token_id]
    model = load_model(world["base"])
    from adapterhub_local.trainer.data import Example

    res = eval_loss(model, [Example(ids, labels)])
    assert res.tokens == 3
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[3:6], torch.tensor([8, 9, tok.eos_token_id]))
    assert res.loss == pytest.approx(float(ref), rel=1e-5)


def test_merged_folder_equals_adapter_applied(world, tmp_path):
    merged = _peft_model(world["base"], world["a"]).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    make_tokenizer(tmp_path / "merged", WORDS)
    rows = evaluate_refs([str(world["base"]), str(world["a"]), str(tmp_path / "merged")],
                         [world["da"]], base=world["base"])
    loss = {r["model"]: r["loss"] for r in rows}
    assert loss[str(world["a"])] == pytest.approx(loss[str(tmp_path / "merged")], abs=1e-5)
    assert loss[str(world["a"])] != pytest.approx(loss[str(world["base"])], abs=1e-3)


def test_cli_eval_table_and_json(world):
    r = CliRunner().invoke(cli, ["eval", str(world["base"]), str(world["a"]), "--base",
                                 str(world["base"]), "--data", str(world["da"]), "--data",
                                 str(world["db"])], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "KIND", "DA", "LOSS"]
    assert len(lines) == 3 and "adapter" in lines[2]
    r = CliRunner().invoke(cli, ["eval", str(world["a"]), "--base", str(world["base"]), "--data",
                                 str(world["da"]), "--json"], catch_exceptions=False)
    rows = json.loads(r.output)
    assert rows[0]["kind"] == "adapter" and rows[0]["label"] == "da"
    assert rows[0]["perplexity"] == pytest.approx(math.exp(rows[0]["loss"]))


@pytest.mark.parametrize("args,needle", [
    (["eval", "{nobase}", "--data", "{da}"], "needs a base model"),
    (["eval", "{base}", "--data", "{bad}"], "bad.jsonl:2: not valid JSON"),
    (["eval", "{base}", "--data", "{nokey}"],
     "nokey.jsonl:1: expected 'text', 'prompt'+'completion' or 'messages' (found: txt)"),
    (["eval", "{root}/missing", "--data", "{da}"], "no such file"),
    (["eval", "{root}", "--data", "{da}"], "neither a model folder"),
    (["eval", "{base}", "--data", "{root}/none.jsonl"], "none.jsonl: no such file"),
    (["sweep", "{a}", "{base}", "--base", "{base}", "--data-a", "{da}", "--data-b", "{db}"],
     "sweep interpolates two adapters"),
])
def test_bad_input_one_line(world, capsys, args, needle):
    root = world["root"]
    (root / "bad.jsonl").write_text('{"text": "w1"}\n{oops\n')
    (root / "nokey.jsonl").write_text('{"txt": "w1"}\n')
    if not (root / "nobase").exists():
        import shutil

        shutil.copytree(world["a"], root / "nobase")
        cfg = json.loads((root / "nobase" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "someone/not-local"
        (root / "nobase" / "adapter_config.json").write_text(json.dumps(cfg))
    fmt = {k: str(v) for k, v in world.items()} | {"bad": str(root / "bad.jsonl"),
                                                    "nokey": str(root / "nokey.jsonl"),
                                                    "nobase": str(root / "nobase")}
    with pytest.raises(SystemExit) as exc:
        main([a.format(**fmt) for a in args])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sweep_is_exact_interpolation(world, tmp_path):
    """Endpoints are the adapters themselves; the midpoint equals 0.5·(W_A + W_B) built
    from PEFT's own merge_and_unload of each adapter."""
    r = CliRunner().invoke(cli, ["sweep", str(world["a"]), str(world["b"]), "--base", str(world["base"]),
                                 "--data-a", str(world["da"]), "--data-b", str(world["db"]),
                                 "--steps", "3", "--json", "--plot", str(tmp_path / "s.png")],
                           catch_exceptions=False)
    res = json.loads(r.output)
    assert [row["t"] for row in res["rows"]] == [0.0, 0.5, 1.0]
    single = {r["model"]: r for r in evaluate_refs([str(world["a"]), str(world["b"])],
                                                   [world["da"], world["db"]], base=world["base"])
              if r["label"] == "da"}
    assert res["rows"][0]["loss_a"] == pytest.approx(single[str(world["a"])]["loss"], abs=1e-5)
    assert res["rows"][2]["loss_a"] == pytest.approx(single[str(world["b"])]["loss"], abs=1e-5)
    wa = _peft_model(world["base"], world["a"]).merge_and_unload().state_dict()
    wb = _peft_model(world["base"], world["b"]).merge_and_unload().state_dict()
    mid = load_model(world["base"])
    mid.load_state_dict({k: 0.5 * wa[k] + 0.5 * wb[k] for k in wa})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    assert res["rows"][1]["loss_b"] == pytest.approx(_reference_loss(mid, tok, world["db"]), abs=1e-5)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registry_ref_finds_its_base_and_checks_the_fingerprint(world, tmp_path, capsys):
    import shutil

    from adapterhub_local.registry import open_registry

    # an adapter whose config names no local base: the registry's base table must find it
    shutil.copytree(world["a"], tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/not-local"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    reg = open_registry()  # $ADAPTERS_HOME from the autouse fixture
    reg.register(tmp_path / "a", "alpha", base_dir=world["base"])
    rows = evaluate_refs(["alpha"], [world["da"]])
    direct = evaluate_refs([str(world["a"])], [world["da"]], base=world["base"])
    assert rows[0]["loss"] == pytest.approx(direct[0]["loss"], abs=1e-6)
    assert rows[0]["base"] == str(world["base"])
    other = make_llama(tmp_path / "other", seed=9)
    make_tokenizer(other, WORDS)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "alpha", "--base", str(other), "--data", str(world["da"])])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "fingerprint mismatch" in err and len(err.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["eval", "alpha", "--base", str(other), "--data", str(world["da"]),
                                 "--force", "--json"], catch_exceptions=False)
    assert r.exit_code == 0
    assert json.loads(r.stdout)[0]["base"] == str(other)
    assert "warning: alpha was trained on" in r.stderr


def test_messages_loss_on_assistant_turns_only(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w9 {{ m['content'] }} "
                         "w8 {% else %}w7 {{ m['content'] }} w8 {% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}w9 {% endif %}")
    msgs = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    (ids, labels), = encode(tok, [{"messages": msgs}])
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["w7", "w1", "w2", "w8", "w9", "w3", "w4", "w8"]
    assert [w for w, lb in zip(words, labels) if lb != -100] == ["w3", "w4", "w8"]


def test_applied_lora_bias_and_modules_to_save_match_peft(world, tmp_path):
    ad = make_peft_adapter(world["base"], tmp_path / "mts", seed=5, lora_bias=True,
                           target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"])
    adapter = load_adapter(ad)
    assert "lm_head.weight" in adapter.extra and any(m.bias is not None for m in adapter.modules.values())
    model = load_model(world["base"])
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with applied(model, [(adapter, 1.0)]):
        ours = model(input_ids=x).logits
    ref = _peft_model(world["base"], ad)(input_ids=x).logits
    assert torch.allclose(ours, ref, atol=1e-5)
    # two adapters replacing the same tensor cannot both win
    from adapterhub_local.errors import InvalidAdapter

    with pytest.raises(InvalidAdapter, match="replaced by two adapters"):
        with applied(model, [(adapter, 1.0), (adapter, 1.0)]):
            pass
    assert torch.allclose(model(input_ids=x).logits, load_model(world["base"])(input_ids=x).logits)


def test_eval_options_max_examples_and_seq_len(world):
    full = evaluate_refs([str(world["base"])], [world["da"]])[0]
    few = evaluate_refs([str(world["base"])], [world["da"]], max_examples=3)[0]
    short = evaluate_refs([str(world["base"])], [world["da"]], seq_len=4)[0]
    assert full["examples"] == 12 and few["examples"] == 3
    assert short["tokens"] == 3 * 12 and full["tokens"] > short["tokens"]


def test_package_exports_the_functions():
    """`from adapterhub_local.eval import sweep` is the function (the module is `interpolation`)."""
    import subprocess
    import sys

    code = ("from adapterhub_local.eval import applied, evaluate_refs, sweep\n"
            "assert callable(sweep) and callable(applied) and callable(evaluate_refs), sweep\n"
            "import adapterhub_local.eval.interpolation as m\nassert m.SweepResult")
    subprocess.run([sys.executable, "-c", code], check=True)
