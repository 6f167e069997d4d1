"""adapterhub_local/provenance.py: every shape ever written reads back; hostile files are one line.

The fixtures under fixtures/provenance/ were written by adapterhub-local 0.1 itself (the
code before the provenance module existed): the flat adapterhub.json of `merge
--into-adapter` and `extract`, the format-1 adapterhub.json of `push --dry-run`, and the
provenance.json of `export`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_hub
from click.testing import CliRunner
from tiny import make_peft_adapter

from adapterhub_local import provenance
from adapterhub_local.cli import cli
from adapterhub_local.errors import AdapterHubError
from adapterhub_local.provenance import ProvenanceError

# the loopback Hub server and the models of test_hub.py, shared as fixtures
hub, hub_env, models = test_hub.hub, test_hub.hub_env, test_hub.models
one_error_line = test_hub.fails  # main(): exactly one `error: ` line on stderr, exit 1, no traceback
FIXTURES = Path(__file__).parent / "fixtures" / "provenance"
FP = "sha256:150b7be05e9fcd522970172ed598255f6998b8dd832f47f6c6628074e3d50015"


# -- every shape ever written ------------------------------------------------------------

@pytest.mark.parametrize("name,written_by,parents,ref,extra", [
    ("v0-flat-merge.json", "merge", ["alpha@1", "beta@1"], None, {"via": "cat"}),
    ("v0-flat-extract.json", "extract", [], None,
     {"tuned_fingerprint": "sha256:9e34ff53bed3ddd83c484d536b12312549860b9e8a39db51ef32e8aa6e2a899a"}),
    ("v1-push-adapter.json", "push", ["alpha@1"], "beta@1", {}),
    ("v1-push-merged-adapter.json", "push", ["alpha@1", "beta@1"], None, {}),
    ("export-provenance.json", "export", ["alpha@1"], "beta@1", None),
])
def test_every_shape_ever_written_reads_as_format_2(tmp_path, name, written_by, parents, ref, extra):
    prov = provenance.read(FIXTURES / name)
    assert prov["format"] == provenance.FORMAT and prov["format_version"] == provenance.FORMAT_VERSION == 2
    assert prov["written_by"] == written_by and prov["kind"] == "adapter"
    assert provenance.base_fingerprint(prov) == FP
    assert prov["lineage"]["parents"] == parents
    assert (prov["registry"] or {}).get("ref") == ref
    if extra is not None:
        assert prov["extra"] == extra
    assert set(prov) == set(provenance.SCHEMA.fields)  # every field, whatever the shape
    # what we write we read back unchanged, and what we read we can write
    assert provenance.loads(provenance.dumps(prov)) == prov
    (tmp_path / "f").mkdir()
    path = provenance.write(tmp_path / "f", prov)
    assert path.name == "adapterhub.json" and provenance.read(tmp_path / "f") == prov


def test_shapes_keep_their_facts():
    flat = provenance.read(FIXTURES / "v0-flat-merge.json")
    assert flat["method"] == "cat" and flat["tool"] == {"name": "adapterhub-local", "version": "0.1.0"}
    v1 = provenance.read(FIXTURES / "v1-push-merged-adapter.json")
    assert v1["recipe"]["method"] == "cat" and [i["weight"] for i in v1["lineage"]["inputs"]] == [0.5, 0.5]
    pushed = provenance.read(FIXTURES / "v1-push-adapter.json")
    assert pushed["adapter"]["r"] == 4 and pushed["base"]["hub_id"] == "org/base"
    assert pushed["files"]["adapter_model.safetensors"].startswith("3452df9c")
    exp = provenance.read(FIXTURES / "export-provenance.json")
    assert exp["registry"]["name"] == "beta" and exp["registry"]["version"] == 1
    assert exp["base"]["name_or_path"] == "/tmp/fixhome/base"
    assert exp["lineage"]["used_in"][0]["method"] == "cat"
    assert exp["extra"]["content_sha256"].startswith("2401688c") and exp["extra"]["home"] == "/tmp/fixhome/home"


def test_a_folder_prefers_adapterhub_json_and_falls_back_to_an_old_export(tmp_path):
    assert provenance.read(tmp_path) is None
    shutil.copy(FIXTURES / "export-provenance.json", tmp_path / "provenance.json")
    assert provenance.read(tmp_path)["written_by"] == "export"
    shutil.copy(FIXTURES / "v0-flat-merge.json", tmp_path / "adapterhub.json")
    assert provenance.read(tmp_path)["written_by"] == "merge"


def test_a_symlinked_provenance_file_is_refused_not_followed(tmp_path, capsys):
    secret = tmp_path / "secret.json"
    secret.write_text('{"base_fingerprint": "sha256:' + "a" * 64 + '"}')
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "adapterhub.json").symlink_to(secret)
    with pytest.raises(AdapterHubError, match="symbolic link"):
        provenance.read(tmp_path / "f")


def test_flat_fingerprints_without_prefix_are_normalised():
    prov = provenance.loads('{"base_fingerprint": "' + "AB" * 32 + '"}')
    assert provenance.base_fingerprint(prov) == "sha256:" + "ab" * 32


def test_build_validates_and_is_deterministic():
    kw = dict(base_fingerprint=FP, parents=["a@1"], metrics={"eval_loss": 1.5}, files={"b": "0" * 64, "a": "1" * 64},
              team={"repo_id": "org/x", "version": 7, "metrics": {"v6": {"eval_loss": 0.5}}},
              source={"repo_id": "org/y", "commit_id": "a" * 40, "version": "v2"})
    a, b = provenance.build("adapter", "push", **kw), provenance.build("adapter", "push", **kw)
    assert provenance.dumps(a) == provenance.dumps(b) and list(a["files"]) == ["a", "b"]
    assert a["team"]["version"] == 7 and a["source"]["commit_id"] == "a" * 40
    with pytest.raises(ProvenanceError, match=r"metrics\.x: must be a finite number"):
        provenance.build("adapter", "push", metrics={"x": float("nan")})
    with pytest.raises(ProvenanceError, match=r"team\.version: must be a positive integer"):
        provenance.build("adapter", "push", team={"version": "v7"})
    with pytest.raises(ProvenanceError, match=r"team\.metrics\.7: key must be a version tag"):
        provenance.build("adapter", "push", team={"version": 7, "metrics": {"7": {"x": 1}}})
    with pytest.raises(ProvenanceError, match=r"team\.metrics\.v7\.x: must be a finite number"):
        provenance.build("adapter", "push", team={"version": 7, "metrics": {"v7": {"x": "1"}}})


# -- strangers' files ----------------------------------------------------------------------

def test_foreign_files_are_refused():
    with pytest.raises(ProvenanceError, match="not valid JSON"):
        provenance.loads(b"{nope")
    with pytest.raises(ProvenanceError, match="not an adapterhub-local provenance"):
        provenance.loads(b'{"format": "other"}')
    with pytest.raises(ProvenanceError, match="not an adapterhub-local provenance"):
        provenance.loads(b'{"model_name": "x", "license": "mit"}')
    with pytest.raises(ProvenanceError, match="newer adapterhub-local"):
        provenance.loads(b'{"format": "adapterhub-local/provenance", "format_version": 99}')


V2 = '{"format": "adapterhub-local/provenance", "format_version": 2, "kind": "adapter", %s}'


@pytest.mark.parametrize("text,field,problem", [
    (V2 % '"metrics": {"eval_loss": NaN}', "metrics.eval_loss", "finite number, got NaN"),
    (V2 % '"metrics": {"eval_loss": -Infinity}', "metrics.eval_loss", "finite number, got -Infinity"),
    (V2 % '"metrics": {"eval_loss": 1e999}', "metrics.eval_loss", "finite number"),
    (V2 % '"metrics": {"eval_loss": 1e300}', "metrics.eval_loss", "within ±2^63"),
    (V2 % ('"registry": {"version": 1' + "0" * 400 + "}"), "registry.version", "finite number"),
    (V2 % '"metrics": {"eval_loss": "0.1"}', "metrics.eval_loss", 'must be a finite number, got "0.1"'),
    (V2 % '"metrics": []', "metrics", "must be an object"),
    (V2 % '"base": {"fingerprint": 5}', "base.fingerprint", "'sha256:' and 64 hex digits"),
    (V2 % '"base": {"fingerprint": "sha256:../../etc"}', "base.fingerprint", "64 hex"),
    (V2 % '"lineage": {"parents": [{"ref": "x"}]}', "lineage.parents[0]", "must be a string"),
    (V2 % '"files": {"a": "not-a-hash"}', "files.a", "64 lowercase hex"),
    (V2 % '"source": {"commit_id": "../../../../tmp/x"}', "source.commit_id", "40-hex commit id"),
    (V2 % '"kind": "virus"', "kind", "one of"),
    (V2 % '"surprise": 1', "surprise", "unknown field"),
    (V2 % '"adapter": {"r": true}', "adapter.r", "must be an integer, got true"),
    (V2 % ('"recipe": ' + "[" * 40 + "]" * 40), "recipe", "nested deeper than 32"),
    ("[" * 200_000 + "]" * 200_000, None, "nested deeper than 32"),
    ('"just a string"', None, "must be a JSON object"),
    ('{"base_fingerprint": ["x"]}', "base_fingerprint", "must be a string"),
    ('{"registry": {"ref": 7}, "files": {}}', "registry.ref", "must be a string"),
])
def test_hostile_documents_are_one_line_naming_the_field(text, field, problem):
    with pytest.raises(ProvenanceError) as e:
        provenance.loads(text, "them/repo/adapterhub.json")
    msg = str(e.value.message)
    assert "\n" not in msg and msg.startswith("them/repo/adapterhub.json: ")
    assert e.value.field == field and problem in msg, msg


def test_huge_and_wide_files_are_refused(tmp_path):
    big = tmp_path / "adapterhub.json"
    big.write_text('{"parents": ["' + "x" * (provenance.MAX_BYTES + 10) + '"]}')
    with pytest.raises(ProvenanceError, match="larger than 4 MiB"):
        provenance.read(big)
    wide = V2 % ('"metrics": {' + ", ".join(f'"m{i}": {i}' for i in range(provenance.MAX_NODES + 1)) + "}")
    assert len(wide) < provenance.MAX_BYTES
    with pytest.raises(ProvenanceError, match="more than 200000 values"):
        provenance.loads(wide)


# -- through the CLI: every command that reads a folder's provenance -------------------------

HOSTILE = {"base_fingerprint": "sha256:" + "0" * 64, "parents": ["a", 3]}


@pytest.fixture
def hostile_adapter(models, tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(models["support"], folder)
    (folder / "adapterhub.json").write_text(json.dumps(HOSTILE))
    return folder


@pytest.mark.parametrize("verb", ["push", "register", "merge", "stack"])
def test_hostile_provenance_in_a_folder_is_one_line(models, hostile_adapter, tmp_path, capsys, verb):
    args = {"push": ["push", str(hostile_adapter), "me/x", "--dry-run"],
            "register": ["register", str(hostile_adapter), "--name", "h"],
            "merge": ["merge", str(models["base"]), str(hostile_adapter), "--out", str(tmp_path / "o")],
            "stack": ["stack", str(hostile_adapter), str(models["support"]), "--out", str(tmp_path / "o")]}[verb]
    line = one_error_line(capsys, *args)
    assert f"{hostile_adapter / 'adapterhub.json'}: parents[1]: must be a string, got 3" in line
    assert not (tmp_path / "o").exists()


def test_old_export_provenance_json_still_feeds_push(models, tmp_path):
    folder = tmp_path / "old-export"
    shutil.copytree(models["support"], folder)
    shutil.copy(FIXTURES / "export-provenance.json", folder / "provenance.json")
    res = CliRunner().invoke(cli, ["push", str(folder), "me/x", "--dry-run", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    staged = Path(json.loads(res.stdout)["staged_dir"])
    assert not (staged / "provenance.json").exists()
    prov = provenance.read(staged)
    assert prov["written_by"] == "push" and provenance.base_fingerprint(prov) == FP
    assert prov["lineage"]["parents"] == ["alpha@1"]


def test_export_writes_format_2_and_reregisters_as_the_same_version(models, tmp_path):
    from adapterhub_local.registry import open_registry

    reg = open_registry()
    rec = reg.register(models["support"], "s", base_dir=models["base"], metrics={"eval_loss": 0.5})
    out = reg.export("s", tmp_path / "exp")
    prov = provenance.read(out)
    assert prov["written_by"] == "export" and prov["registry"]["ref"] == "s@1"
    assert provenance.base_fingerprint(prov) == rec.base_fingerprint and prov["metrics"] == {"eval_loss": 0.5}
    assert prov["files"] == rec.files and prov["extra"]["content_sha256"] == rec.content_sha256
    again = reg.register(out, "s")
    assert again.is_new is False and again.ref == "s@1"


@pytest.mark.parametrize("body,field", [
    (json.dumps({"format": "adapterhub-local/provenance", "format_version": 2, "kind": "adapter",
                 "metrics": {"eval_loss": 1e308}}), "metrics.eval_loss"),
    ('{"format": "adapterhub-local/provenance", "format_version": 1, "kind": "adapter", '
     '"metrics": {"eval_loss": NaN}}', "metrics.eval_loss"),
    ('{"format": "adapterhub-local/provenance", "format_version": 2, "kind": "adapter", "recipe": '
     + "{\"a\": " * 50 + "1" + "}" * 50 + "}", "recipe"),
    ('{"format": "adapterhub-local/provenance", "format_version": 2, "kind": "adapter", '
     '"lineage": {"parents": "alice@1"}}', "lineage.parents"),
])
def test_pull_of_a_hostile_adapterhub_json_is_one_line_and_registers_nothing(hub_env, models, capsys, body, field):
    import hashlib

    from adapterhub_local.registry import open_registry

    files = {n: (models["support"] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    repo = f"carol/hostile-{hashlib.sha1(body.encode()).hexdigest()[:8]}"
    hub_env.add_repo(repo, {**files, "adapterhub.json": body.encode()}, owner="carol")
    line = one_error_line(capsys, "pull", repo)
    assert f"{repo}@" in line and f"/adapterhub.json: {field}" in line, line
    assert open_registry().names() == []


def test_pull_of_a_huge_adapterhub_json_is_one_line(hub_env, models, capsys):
    files = {n: (models["support"] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    hub_env.add_repo("carol/huge-prov", {**files, "adapterhub.json": b" " * (provenance.MAX_BYTES + 1) + b"{}"},
                     owner="carol")
    assert "adapterhub.json: larger than 4 MiB" in one_error_line(capsys, "pull", "carol/huge-prov")


def test_pull_reads_a_flat_adapterhub_json(hub_env, models, tmp_path):
    """Someone uploaded an `adapters merge --into-adapter` folder by hand: its 0.1 flat file reads."""
    ad = make_peft_adapter(models["base"], tmp_path / "m", seed=21)
    files = {n: (ad / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    hub_env.add_repo("carol/flat", {**files, "adapterhub.json": (FIXTURES / "v0-flat-merge.json").read_bytes()},
                     owner="carol")
    res = CliRunner().invoke(cli, ["pull", "carol/flat", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["base_fingerprint"] == FP
    assert json.loads(res.stdout)["parents_missing"] == ["alpha@1", "beta@1"]


def test_record_provenance_travels_without_nesting_the_files_it_came_from(models, tmp_path):
    from adapterhub_local.registry import open_registry

    reg = open_registry()
    pulled = provenance.read(FIXTURES / "v1-push-adapter.json")
    reg.register(models["support"], "s", provenance={"tool": "adapters train", "source": "hub",
                                                     "repo_id": "them/s", "commit_id": "c" * 40,
                                                     "adapterhub": pulled})
    res = CliRunner().invoke(cli, ["push", "s", "me/s", "--dry-run", "--json"], catch_exceptions=False)
    prov = provenance.read(Path(json.loads(res.stdout)["staged_dir"]))
    assert prov["source"] == {"repo_id": "them/s", "commit_id": "c" * 40}
    assert prov["extra"]["record_provenance"] == {"tool": "adapters train", "source": "hub", "repo_id": "them/s",
                                                  "commit_id": "c" * 40}
    # export -> register -> export keeps the same depth
    first = reg.export("s", tmp_path / "e1")
    reg.register(first, "s2")
    second = provenance.read(reg.export("s2", tmp_path / "e2"))
    assert "record_provenance" not in second["extra"]  # s2's own provenance is only the export it came from
    assert second["source"] == {"repo_id": "them/s", "commit_id": "c" * 40}  # which said where s came from
