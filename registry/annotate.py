"""What may change about a version after it is registered: metrics, aliases, Hub pushes."""

from __future__ import annotations

from ..errors import AdapterNotFound
from .common import check_name, now
from .query import check_metrics


def metric_key(key: str, split: str | None) -> str:
    """The flat name `list --where` filters on: ``loss`` logged with split ``eval`` is ``eval_loss``."""
    if not split or key.startswith(f"{split}_"):
        return key
    return f"{split}_{key}"


def log_metrics(self, ref, metrics: dict, step: int | None = None, split: str | None = None):
    """Record metric values for a version. Every value is kept (with step and split);
    the latest one per key is what `show` and `list --where` see."""
    rec = self.resolve(ref)
    metrics = check_metrics(metrics)
    if split is not None:
        split = check_name(split, "split")
    if step is not None:
        step = int(step)
    stamp = now()
    with self._write() as conn:
        for key, value in metrics.items():
            conn.execute("INSERT INTO metrics (version_id, key, value, step, split, logged_at) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (rec.id, key, value, step, split, stamp))
            conn.execute("INSERT INTO metric_values (version_id, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT(version_id, key) DO UPDATE SET value = excluded.value",
                         (rec.id, metric_key(key, split), value))
    return self.get(rec.id)


def metric_history(self, ref, key: str | None = None) -> list[dict]:
    rec = self.resolve(ref)
    sql = "SELECT key, value, step, split, logged_at FROM metrics WHERE version_id = ?"
    params: list = [rec.id]
    if key:
        sql += " AND key = ?"
        params.append(key)
    return self._q(sql + " ORDER BY id", params)


def set_alias(self, ref, alias: str, *, source: str | None = None) -> tuple:
    """Point ``name:alias`` at the version ``ref`` (atomically); returns (record, previous ref or None).

    ``source``: the Hub repo (``ORG/NAME``) the alias was taken from by `adapters sync`;
    None (every alias a user sets) marks it as set here, which sync never moves."""
    check_name(alias, "alias")
    rec = self.resolve(ref)
    with self._write() as conn:
        adapter_id = conn.execute("SELECT adapter_id FROM versions WHERE id = ?", (rec.id,)).fetchone()[0]
        prev = conn.execute("SELECT v.version FROM aliases a JOIN versions v ON v.id = a.version_id "
                            "WHERE a.adapter_id = ? AND a.alias = ?", (adapter_id, alias)).fetchone()
        conn.execute("INSERT INTO aliases (adapter_id, alias, version_id, updated_at, source) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT(adapter_id, alias) DO UPDATE SET version_id = excluded.version_id, "
                     "updated_at = excluded.updated_at, source = excluded.source",
                     (adapter_id, alias, rec.id, now(), source))
    return self.get(rec.id), (f"{rec.name}@{prev[0]}" if prev else None)


def alias_sources(self, name: str) -> dict[str, dict]:
    """{alias: {"ref", "version_id", "source"}} of adapter ``name``; source None: set here."""
    rows = self._q("SELECT a.alias, a.version_id, a.source, v.version FROM aliases a JOIN adapters d "
                   "ON d.id = a.adapter_id JOIN versions v ON v.id = a.version_id WHERE d.name = ?", (name,))
    return {r["alias"]: {"ref": f"{name}@{r['version']}", "version_id": r["version_id"], "source": r["source"]}
            for r in rows}


def remove_alias(self, name: str, alias: str) -> str:
    """Remove ``name:alias``; returns the ref it pointed at."""
    with self._write() as conn:
        row = conn.execute("SELECT a.adapter_id, v.version FROM aliases a JOIN adapters d ON d.id = a.adapter_id "
                           "JOIN versions v ON v.id = a.version_id WHERE d.name = ? AND a.alias = ?",
                           (name, alias)).fetchone()
        if row is None:
            have = conn.execute("SELECT a.alias FROM aliases a JOIN adapters d ON d.id = a.adapter_id "
                                "WHERE d.name = ? ORDER BY a.alias", (name,)).fetchall()
            raise AdapterNotFound(f"{name}:{alias}", [f"{name}:{a[0]}" for a in have])
        conn.execute("DELETE FROM aliases WHERE adapter_id = ? AND alias = ?", (row[0], alias))
    return f"{name}@{row[1]}"


def set_hub(self, ref, repo_id: str, revision: str | None = None, commit_id: str | None = None):
    """Remember that a version was pushed to the Hub (repo, revision, commit)."""
    rec = self.resolve(ref)
    with self._write() as conn:
        conn.execute("INSERT INTO hub (version_id, repo_id, revision, commit_id, pushed_at) VALUES (?, ?, ?, ?, ?)",
                     (rec.id, str(repo_id), revision, commit_id, now()))
    return self.get(rec.id)
