"""Registry library: versions, dedup, references, aliases, metrics, base checks, lineage,
export, rm/gc/verify, corrupted blobs and bad registries."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from adapterhub_local.registry import BlobCorrupt, open_registry

from adapterhub_local.errors import (
    AdapterHubError,
    AdapterNotFound,
    InvalidAdapter,
    RegistryError,
    ShapeMismatch,
)
from adapterhub_local.peft_format import (
    WEIGHTS_NAME,
    load_adapter,
    lora_config,
    parse_state_dict,
    save_adapter,
)

# tiny llama (tests/tiny.py defaults): hidden 32, 4 heads, 2 kv heads -> k/v out 16
OUT = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}


def make_adapter(out: Path, seed: int = 0, r: int = 4, targets=("q_proj", "v_proj"), hidden: int = 32,
                 layers: int = 2, alpha: float = 8, **cfg) -> Path:
    """A PEFT folder for the tiny llama built with our writer (fast: no transformers/PEFT)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for t in targets:
            name = f"base_model.model.model.layers.{i}.self_attn.{t}"
            out_dim = OUT[t] * hidden // 32
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.1
    config = lora_config(r=r, lora_alpha=alpha, target_modules=sorted(targets), **cfg)
    save_adapter(parse_state_dict(tensors, config), out)
    return Path(out)


@pytest.fixture
def reg(tmp_path):
    r = open_registry(tmp_path / "home")
    yield r
    r.close()


def test_register_versions_and_dedup(reg, tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2)
    r1 = reg.register(a, "support", metrics={"eval_loss": 1.25}, tags={"domain": "support"}, note="first")
    assert (r1.ref, r1.version, r1.is_new) == ("support@1", 1, True)
    assert r1.rank == 4 and r1.alpha == 8 and r1.targets == ["q_proj", "v_proj"]
    assert set(r1.files) == {"adapter_config.json", WEIGHTS_NAME}
    assert r1.files[WEIGHTS_NAME] == hashlib.sha256((a / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert r1.size == sum(p.stat().st_size for p in a.iterdir())
    assert r1.config["r"] == 4 and r1.metrics == {"eval_loss": 1.25} and r1.tags == {"domain": "support"}
    again = reg.register(a, "support", metrics={"eval_loss": 1.2})
    assert (again.ref, again.is_new) == ("support@1", False)
    assert again.metrics == {"eval_loss": 1.2}  # applied to the existing version
    r2 = reg.register(b, "support")
    assert r2.ref == "support@2" and r2.is_new
    # same bytes under another name: a new name's version, blobs stored once
    other = reg.register(a, "other")
    assert other.ref == "other@1" and other.files == r1.files
    blobs = [p for p in (reg.home / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 3  # one shared adapter_config.json + two weight files
    assert reg.resolve("support").ref == "support@2"
    assert reg.resolve("support@1").ref == "support@1"
    assert reg.resolve("support:latest").ref == "support@2"


def test_blob_is_content_addressed_and_read_only(reg, tmp_path):
    rec = reg.register(make_adapter(tmp_path / "a"), "x")
    sha = rec.files[WEIGHTS_NAME]
    blob = reg.home / "blobs" / sha[:2] / sha
    assert blob.is_file() and hashlib.sha256(blob.read_bytes()).hexdigest() == sha
    assert blob.stat().st_mode & 0o222 == 0


def test_adapter_path_is_verified_peft_folder(reg, tmp_path):
    a = make_adapter(tmp_path / "a", seed=3)
    reg.register(a, "x")
    path = reg.adapter_path("x")
    assert (path / "adapter_config.json").is_file()
    got, want = load_adapter(path).to_torch(), load_adapter(a).to_torch()
    for name, m in want.modules.items():
        assert torch.equal(got.modules[name].A, m.A) and torch.equal(got.modules[name].B, m.B)
    assert reg.adapter_path(reg.resolve("x")) == path  # second call reuses the checkout


def test_unknown_refs_suggest_close_names(reg, tmp_path):
    reg.register(make_adapter(tmp_path / "a"), "support")
    with pytest.raises(AdapterNotFound) as e:
        reg.resolve("suport")
    assert e.value.close == ["support"]
    with pytest.raises(AdapterNotFound) as e:
        reg.resolve("support@7")
    assert e.value.close == ["support@1"]
    with pytest.raises(AdapterNotFound) as e:
        reg.resolve("support:prod")
    assert "support" in str(e.value)


def test_aliases_move_and_remove(reg, tmp_path):
    reg.register(make_adapter(tmp_path / "a", seed=1), "s", aliases=["prod"])
    reg.register(make_adapter(tmp_path / "b", seed=2), "s")
    assert reg.resolve("s:prod").version == 1
    rec, prev = reg.set_alias("s@2", "prod")
    assert (rec.ref, prev) == ("s@2", "s@1")
    assert reg.resolve("s:prod").version == 2
    assert reg.resolve("s@1").aliases == []
    assert reg.remove_alias("s", "prod") == "s@2"
    with pytest.raises(AdapterNotFound):
        reg.resolve("s:prod")
    with pytest.raises(AdapterNotFound):
        reg.remove_alias("s", "prod")
    with pytest.raises(AdapterHubError):
        reg.set_alias("s@1", "latest")


def test_metrics_where_and_sort(reg, tmp_path):
    losses = [1.5, 0.9, 1.1, 2.0]
    for i, loss in enumerate(losses):
        reg.register(make_adapter(tmp_path / f"a{i}", seed=i), f"ad{i}", metrics={"eval_loss": loss, "acc": i / 10})
    got = reg.list(where=["eval_loss<1.2"])
    assert sorted(r.name for r in got) == ["ad1", "ad2"]
    assert [r.name for r in reg.list(where=["eval_loss<=1.5 and acc>=0.1"], sort="eval_loss")] == ["ad1", "ad2"]
    assert [r.name for r in reg.list(where=["eval_loss>1", "acc!=0"])] == ["ad3", "ad2"]
    assert [r.name for r in reg.list(where=["eval_loss=1.5"])] == ["ad0"]
    assert [r.name for r in reg.list(sort="eval_loss")] == ["ad1", "ad2", "ad0", "ad3"]
    assert [r.name for r in reg.list(sort="-eval_loss", limit=2)] == ["ad3", "ad0"]
    assert [r.name for r in reg.list(name="ad[01]")] == ["ad1", "ad0"]
    assert reg.list(where=["rank=4"], limit=None) and not reg.list(where=["rank>4"])
    # a value logged with a split is filtered by its flat name; history keeps every value
    reg.log_metrics("ad3", {"loss": 0.5}, step=10, split="eval")
    assert reg.resolve("ad3").metrics["eval_loss"] == 0.5
    assert [r.name for r in reg.list(where=["eval_loss<0.6"])] == ["ad3"]
    hist = reg.metric_history("ad3")
    assert [(h["key"], h["value"], h["step"], h["split"]) for h in hist][-1] == ("loss", 0.5, 10, "eval")
    assert len(hist) == 3


@pytest.mark.parametrize("bad", ["eval_loss<<1", "eval_loss", "1<2", "x<abc", "x<nan", "x ~ 3"])
def test_where_rejects_bad_conditions(reg, bad):
    with pytest.raises(AdapterHubError):
        reg.list(where=[bad])


def test_where_is_not_sql(reg, tmp_path):
    reg.register(make_adapter(tmp_path / "a"), "a", metrics={"m": 1})
    with pytest.raises(AdapterHubError):
        reg.list(where=["m<1; DROP TABLE versions"])
    with pytest.raises(AdapterHubError):
        reg.list(sort="m; DROP TABLE versions")
    assert reg.list(name="' OR 1=1 --") == []
    assert len(reg.list()) == 1


def test_bad_metric_values(reg, tmp_path):
    a = make_adapter(tmp_path / "a")
    for metrics in ({"x": float("nan")}, {"x": "abc"}, {"bad key": 1.0}, {"x": float("inf")}):
        with pytest.raises(AdapterHubError):
            reg.register(a, "a", metrics=metrics)
    assert reg.list() == []


def test_base_recorded_and_shapes_checked(reg, tmp_path, llama_dir):
    from adapterhub_local.fingerprint import fingerprint_model

    fp = fingerprint_model(llama_dir)
    rec = reg.register(make_adapter(tmp_path / "ok", targets=("q_proj", "k_proj", "v_proj", "o_proj")), "ok",
                       base_dir=llama_dir)
    assert rec.base_fingerprint == fp.fingerprint
    base = reg.base_model(fp.fingerprint)
    assert base["architecture"] == "LlamaForCausalLM" and base["num_parameters"] == fp.num_parameters
    assert base["files"] == fp.files and base["dtype"] == "F32"
    assert [r.name for r in reg.list(base=fp.fingerprint[:19])] == ["ok"]
    assert [r.name for r in reg.list(base=str(Path(llama_dir).resolve()))] == ["ok"]
    # a wider adapter does not fit: refused, nothing stored
    wide = make_adapter(tmp_path / "wide", hidden=48)
    with pytest.raises(ShapeMismatch) as e:
        reg.register(wide, "wide", base_dir=llama_dir)
    assert "q_proj" in str(e.value) and "[32, 32]" in str(e.value)
    # the same check runs from the stored shapes when only the fingerprint is given
    with pytest.raises(ShapeMismatch):
        reg.register(wide, "wide", base_fingerprint=fp.fingerprint)
    with pytest.raises(AdapterHubError):
        reg.register(make_adapter(tmp_path / "gate", targets=("q_proj",)), "g", base_dir=llama_dir,
                     base_fingerprint="sha256:" + "0" * 64)
    assert [r.name for r in reg.list()] == ["ok"]
    assert len(list((reg.home / "blobs").rglob("*/*"))) == 2
    with pytest.raises(AdapterHubError):
        reg.register(wide, "wide", base_fingerprint="not-a-fingerprint")
    # an unknown fingerprint is recorded as given
    rec = reg.register(make_adapter(tmp_path / "u", seed=5), "u", base_fingerprint="AB" * 32)
    assert rec.base_fingerprint == "sha256:" + "ab" * 32


def test_export_loads_in_peft_and_matches(reg, tmp_path, llama_dir):
    from peft import PeftModel
    from tiny import input_ids, load_model

    a = make_adapter(tmp_path / "a", seed=4, targets=("q_proj", "v_proj"))
    reg.register(a, "s", base_dir=llama_dir, parents=(), metrics={"eval_loss": 1.0})
    out = reg.export("s", tmp_path / "exported")
    prov = json.loads((out / "adapterhub.json").read_text())  # provenance.json up to 0.1
    assert prov["registry"]["ref"] == "s@1" and prov["base"]["fingerprint"].startswith("sha256:")
    assert prov["files"] == reg.resolve("s").files and "lineage" in prov
    ids = input_ids()
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(llama_dir), str(a))(ids).logits
        got = PeftModel.from_pretrained(load_model(llama_dir), str(out))(ids).logits
    assert torch.equal(want, got)
    # exporting onto an existing folder is refused unless overwrite
    with pytest.raises(AdapterHubError):
        reg.export("s", out)
    reg.export("s", out, overwrite=True)
    # registering an export again: same bytes (adapterhub.json is not part of the version)
    assert reg.register(out, "s").is_new is False


def test_lineage_and_merges(reg, tmp_path):
    a = reg.register(make_adapter(tmp_path / "a", seed=1), "a")
    b = reg.register(make_adapter(tmp_path / "b", seed=2), "b")
    m = reg.register(make_adapter(tmp_path / "m", seed=3), "merged", parents=["a", b])
    assert m.parents == ["a@1", "b@1"]
    assert reg.resolve("a").children == ["merged@1"]
    mid = reg.record_merge([a, "b@1"], [0.7, 0.3], "linear", {"density": None}, "merged@1",
                           {"inputs": ["a@1", "b@1"]}, output_version=m)
    info = reg.merge(mid)
    assert info["method"] == "linear" and info["weights"] == [0.7, 0.3]
    assert [i["ref"] for i in info["inputs"]] == ["a@1", "b@1"] and info["output_version"] == "merged@1"
    assert reg.merges_for("merged")["made_by"][0]["id"] == mid
    assert reg.merges_for("a")["used_in"][0]["id"] == mid
    g = reg.register(make_adapter(tmp_path / "g", seed=4), "grand", parents=["merged"])
    lin = reg.lineage(g)
    assert [(x["ref"], x["depth"]) for x in lin["ancestors"]] == [("merged@1", 1), ("a@1", 2), ("b@1", 2)]
    assert [x["ref"] for x in reg.lineage("a")["descendants"]] == ["merged@1", "grand@1"]
    # a path input that is registered links to its version; one that is not is kept as a path
    unreg = make_adapter(tmp_path / "unregistered", seed=7)
    mid2 = reg.record_merge([tmp_path / "a", unreg], None, "cat", {}, "out", {})
    assert [(i["ref"], i["registered"]) for i in reg.merge(mid2)["inputs"]] == [("a@1", True),
                                                                               (str(unreg), False)]
    with pytest.raises(AdapterHubError):
        reg.record_merge(["a"], [1.0, 2.0], "linear", {}, "x", {})
    hub = reg.set_hub("merged", "me/merged", "main", "abc123")
    assert hub.hub[0]["repo_id"] == "me/merged"


def test_rm_refuses_dependents_and_keeps_shared_blobs(reg, tmp_path):
    a_dir = make_adapter(tmp_path / "a", seed=1)
    a = reg.register(a_dir, "a")
    twin = reg.register(a_dir, "twin")  # same blobs
    m = reg.register(make_adapter(tmp_path / "m", seed=3, r=2), "m")  # shares no blob with a
    reg.record_merge([a], [1.0], "linear", {}, "m", {}, output_version=m)
    with pytest.raises(RegistryError) as e:
        reg.rm("a")
    assert "merge #1" in str(e.value) and "--force" in str(e.value)
    report = reg.rm("a", force=True)
    assert report["blobs_removed"] == 0  # twin still uses them
    assert reg.adapter_path(twin).is_dir() and reg.verify()["ok"]
    assert reg.resolve("m").parents == ["a@1"]  # lineage keeps the name
    report = reg.rm("twin")
    assert report["blobs_removed"] == 2 and report["bytes_freed"] == twin.size
    assert reg.verify()["ok"] and reg.verify()["orphans"] == []
    # numbers are never reused
    assert reg.register(a_dir, "a").ref == "a@2"


def test_corrupted_blob_detected_everywhere(reg, tmp_path):
    rec = reg.register(make_adapter(tmp_path / "a"), "a")
    reg.adapter_path(rec)
    sha = rec.files[WEIGHTS_NAME]
    blob = reg.home / "blobs" / sha[:2] / sha
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    report = reg.verify()
    assert not report["ok"]
    assert report["problems"][0]["blob"] == str(blob) and report["problems"][0]["expected"] == sha
    assert not reg.verify("a")["ok"]
    for call in (lambda: reg.export("a", tmp_path / "out"), lambda: reg.adapter_path("a")):
        with pytest.raises(BlobCorrupt) as e:
            call()
        assert str(blob) in str(e.value) and sha in str(e.value)
    assert not (tmp_path / "out").exists()
    blob.unlink()
    with pytest.raises(BlobCorrupt, match="missing"):
        reg.export("a", tmp_path / "out")


def test_gc_removes_orphans_and_stale_temps(reg, tmp_path):
    reg.register(make_adapter(tmp_path / "a"), "a")
    orphan = reg.blobs.path("ab" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    reg.blobs.tmp_dir.mkdir(exist_ok=True)
    dead = reg.blobs.tmp_dir / "999999999-abc.tmp"
    dead.write_bytes(b"y" * 10)
    report = reg.verify()
    assert report["ok"] and len(report["orphans"]) == 2
    dry = reg.gc(dry_run=True)
    assert dry["bytes_freed"] == 110 and orphan.exists()
    report = reg.gc()
    assert report["blobs_removed"] == 1 and report["temp_files_removed"] == 1 and report["bytes_freed"] == 110
    assert not orphan.exists() and not dead.exists()
    assert reg.verify() == {**reg.verify(), "ok": True, "orphans": []}


def test_crash_between_blobs_and_rows_leaves_only_orphans(reg, tmp_path, monkeypatch):
    from adapterhub_local.registry import core

    a = make_adapter(tmp_path / "a")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(core.Registry, "_write", boom)
    with pytest.raises(KeyboardInterrupt):
        reg.register(a, "a")
    monkeypatch.undo()
    assert reg.list() == []
    report = reg.verify()
    assert report["ok"] and len(report["orphans"]) == 2
    reg.gc()
    assert reg.verify()["orphans"] == []
    # a failure inside the transaction rolls every row back
    real = reg.conn

    class Flaky:
        def __init__(self, conn):
            self.conn = conn

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def executemany(self, sql, rows):
            if "version_files" in sql:
                raise sqlite3.OperationalError("disk I/O error (simulated)")
            return self.conn.executemany(sql, rows)

    reg.conn = Flaky(real)
    with pytest.raises(sqlite3.OperationalError):
        reg.register(a, "a")
    reg.conn = real
    assert reg.list() == [] and reg.verify()["ok"]
    assert reg.register(a, "a").ref == "a@1"  # the number was not consumed


def test_not_an_adapter_and_bad_names(reg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidAdapter):
        reg.register(tmp_path / "empty", "x")
    with pytest.raises(InvalidAdapter):
        reg.register(tmp_path / "missing", "x")
    a = make_adapter(tmp_path / "a")
    for name in ("", "a/b", "a@1", "a:b", "-x", "12"):
        with pytest.raises(AdapterHubError):
            reg.register(a, name)
    assert reg.list() == [] and not any((reg.home / "blobs").rglob("*/*"))


def test_not_sqlite_and_newer_schema_refused(tmp_path):
    home = tmp_path / "h1"
    home.mkdir()
    (home / "registry.db").write_bytes(b"this is not a database" * 10)
    before = (home / "registry.db").read_bytes()
    with pytest.raises(RegistryError, match="not an SQLite database"):
        open_registry(home)
    assert (home / "registry.db").read_bytes() == before
    reg = open_registry(tmp_path / "h2")
    reg.register(make_adapter(tmp_path / "a"), "a")
    reg.conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
                     "VALUES ('adapterhub-local', 'm999_future', 'x')")
    reg.conn.commit()
    reg.close()
    db = tmp_path / "h2" / "registry.db"
    before = db.read_bytes()
    with pytest.raises(RegistryError, match="newer"):
        open_registry(tmp_path / "h2")
    assert db.read_bytes() == before


def test_migrations_are_numbered_and_recorded(reg):
    from adapterhub_local.registry.schema import KNOWN

    assert KNOWN[0] == "m001_initial" and all(n[:1] == "m" and n[1:4].isdigit() for n in KNOWN)
    rows = reg.conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id").fetchall()
    assert [r[0] for r in rows] == KNOWN
    assert reg.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert reg.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_registry_home_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERS_HOME", str(tmp_path / "envhome"))
    reg = open_registry()
    assert reg.home == tmp_path / "envhome" and (tmp_path / "envhome" / "registry.db").is_file()
    assert (tmp_path / "envhome" / "blobs").is_dir()


def test_resolve_registered_path(reg, tmp_path):
    a = make_adapter(tmp_path / "a")
    reg.register(a, "a")
    assert reg.resolve(str(a)).ref == "a@1"
    with pytest.raises(AdapterNotFound):
        reg.resolve(str(make_adapter(tmp_path / "b", seed=9)))


def test_only_adapter_files_are_stored(reg, tmp_path):
    a = make_adapter(tmp_path / "a")
    (a / "README.md").write_text("# card\n")
    (a / "optimizer.pt").write_bytes(b"\0" * 100)
    (a / "checkpoint-500").mkdir()
    (a / "checkpoint-500" / "big.bin").write_bytes(b"\0" * 100)
    (a / ".DS_Store").write_bytes(b"x")
    rec = reg.register(a, "a", provenance={"recipe": {"loss": float("nan"), "path": tmp_path, "t": (1, 2)}})
    assert sorted(rec.files) == ["README.md", "adapter_config.json", WEIGHTS_NAME]
    assert sorted(rec.provenance["skipped_files"]) == ["checkpoint-500/", "optimizer.pt"]
    assert rec.provenance["recipe"] == {"loss": None, "path": str(tmp_path), "t": [1, 2]}
    from adapterhub_local.registry.core import NotRegistered

    (a / "README.md").write_text("# changed\n")
    with pytest.raises(NotRegistered, match="not a registered version"):
        reg.resolve(str(a))


def test_list_by_base_folder_and_short_fingerprint(reg, tmp_path, llama_dir):
    rec = reg.register(make_adapter(tmp_path / "a"), "a", base_dir=llama_dir)
    reg.register(make_adapter(tmp_path / "b", seed=2), "b", base_fingerprint="cd" * 32)
    for base in (str(llama_dir), rec.base_fingerprint.split(":")[1][:12], Path(llama_dir).name):
        assert [r.ref for r in reg.list(base=base)] == ["a@1"], base
    assert [r.ref for r in reg.list(base="cdcdcd")] == ["b@1"]


def test_resolve_adapter_helper_uses_registry(reg, tmp_path):
    from adapterhub_local.refs import resolve_adapter

    a = make_adapter(tmp_path / "a")
    rec = reg.register(a, "a", aliases=["prod"])
    folder, got = resolve_adapter("a:prod", reg.home)
    assert got.ref == rec.ref and (folder / WEIGHTS_NAME).read_bytes() == (a / WEIGHTS_NAME).read_bytes()
    folder, got = resolve_adapter(str(a), reg.home)
    assert folder == a and got is None


def _synthetic(reg, n: int, seed: int = 0) -> dict[int, dict]:
    """n version rows with random metrics (some missing), straight into the schema."""
    import random

    rng = random.Random(seed)
    truth: dict[int, dict] = {}
    with reg._write() as conn:
        for a in range(5):
            conn.execute("INSERT INTO adapters (id, name, last_version, created_at) VALUES (?, ?, 0, 'x')",
                         (a + 1, f"n{a}"))
        for vid in range(1, n + 1):
            a = vid % 5
            rank = rng.choice([4, 8, 16])
            conn.execute("INSERT INTO versions (id, adapter_id, name, version, content_sha256, rank, size, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, 'x')", (vid, a + 1, f"n{a}", vid, f"{vid:064x}", rank, 100))
            m = {k: round(rng.uniform(0, 2), 2) for k in ("loss", "acc") if rng.random() < 0.8}
            for k, v in m.items():
                conn.execute("INSERT INTO metric_values VALUES (?, ?, ?)", (vid, k, v))
            truth[vid] = {"name": f"n{a}", "rank": rank, **m}
    return truth


def test_list_filters_match_an_independent_computation(reg):
    import operator
    import random

    truth = _synthetic(reg, 400)
    ops = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq,
           "!=": operator.ne}
    rng = random.Random(1)
    for _ in range(60):
        conds = [(rng.choice(["loss", "acc", "rank"]), rng.choice(list(ops)),
                  rng.choice([0.5, 1.0, 1.5, 8, round(rng.uniform(0, 2), 2)])) for _ in range(rng.randint(0, 3))]
        sort = rng.choice([None, "loss", "-acc", "rank", "-created"])
        name = rng.choice([None, "n[12]"])
        limit = rng.choice([None, 7, 50])
        want = [vid for vid, row in truth.items()
                if all(k in row and ops[op](row[k], v) for k, op, v in conds)
                and (name is None or row["name"] in ("n1", "n2"))]
        if sort in ("loss", "-acc", "rank"):
            key = sort.lstrip("-")
            want = [v for v in want if key in truth[v]]
            sign = -1 if sort.startswith("-") else 1
            want.sort(key=lambda v: (sign * truth[v][key], -v))
        else:
            want.sort(reverse=True)
        if limit:
            want = want[:limit]
        where = [" and ".join(f"{k}{op}{v}" for k, op, v in conds)] if conds else []
        got = [r.id for r in reg.list(where=where, sort=sort, name=name, limit=limit)]
        assert got == want, (conds, sort, name, limit)


def test_gc_between_blob_write_and_rows_is_repaired(reg, tmp_path, monkeypatch):
    """gc running while a register is between storing blobs and writing rows deletes
    those (still orphan) blobs; register notices under the write lock and stores them again."""
    from adapterhub_local.registry import core

    a = make_adapter(tmp_path / "a")
    other = open_registry(reg.home)
    real_write = core.Registry._write
    calls = []

    def gc_first(self):
        if not calls:
            calls.append(None)  # gc itself goes through _write
            calls[0] = other.gc()
        return real_write(self)

    monkeypatch.setattr(core.Registry, "_write", gc_first)
    rec = reg.register(a, "a")
    monkeypatch.undo()
    assert calls[0]["blobs_removed"] == 2  # gc really took them
    report = reg.verify()
    assert report["ok"] and report["orphans"] == [] and reg.adapter_path(rec).is_dir()


def test_blob_store_write_failure_is_a_registry_error(reg, tmp_path, monkeypatch):
    import os as _os

    a = make_adapter(tmp_path / "a")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_os, "fsync", no_space)
    with pytest.raises(RegistryError, match="No space left"):
        reg.register(a, "a")
    monkeypatch.undo()
    assert reg.list() == [] and not any(reg.blobs.tmp_dir.iterdir())
