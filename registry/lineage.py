"""Merges (inputs, weights, method, parameters, output, recipe) and lineage queries."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterHubError
from .common import now
from .records import VersionRecord, dumps, loads


def _input_entry(self, item) -> tuple[str, int | None]:
    if isinstance(item, VersionRecord):
        return item.ref, item.id
    text = str(item)
    path = Path(text).expanduser()
    if path.exists():
        found = self.find_by_content(path) if path.is_dir() else []
        return (found[-1].ref, found[-1].id) if found else (str(path.resolve()), None)
    rec = self.resolve(text)
    return rec.ref, rec.id


def record_merge(self, inputs, weights=None, method: str = "", params: dict | None = None,
                 output=None, recipe: dict | None = None, output_version=None) -> int:
    """Record one merge so it can be run again; returns its id.

    ``inputs``: refs, VersionRecords or paths (a path whose bytes are registered is
    linked to that version). With ``output_version`` (a ref or record) the output is
    linked as a child of every registered input.
    """
    entries = [_input_entry(self, i) for i in inputs]
    weights = list(weights) if weights is not None else [None] * len(entries)
    if len(weights) != len(entries):
        raise AdapterHubError(f"record_merge: {len(entries)} inputs but {len(weights)} weights")
    if not method:
        raise AdapterHubError("record_merge: method is required")
    out_rec = self.resolve(output_version) if output_version is not None else None
    with self._write() as conn:
        merge_id = conn.execute(
            "INSERT INTO merges (created_at, method, weights, params, output, recipe, output_version_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now(), method, dumps([None if w is None else float(w) for w in weights]), dumps(params or {}),
             None if output is None else str(output), dumps(recipe or {}), out_rec.id if out_rec else None),
        ).lastrowid
        conn.executemany(
            "INSERT INTO merge_inputs (merge_id, position, ref, version_id, weight) VALUES (?, ?, ?, ?, ?)",
            [(merge_id, i, ref, vid, None if w is None else float(w))
             for i, ((ref, vid), w) in enumerate(zip(entries, weights))])
        if out_rec is not None:
            _link(conn, merge_id, out_rec.id, entries)
    return merge_id


def _link(conn, merge_id: int, child_id: int, entries) -> None:
    for ref, vid in entries:
        if vid == child_id:
            continue
        conn.execute("INSERT INTO lineage (child_id, parent_ref, parent_id, merge_id) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT(child_id, parent_ref) DO UPDATE SET merge_id = excluded.merge_id",
                     (child_id, ref, vid, merge_id))


def set_merge_output(self, merge_id: int, output_version) -> None:
    """Link a merge to the version registered from its output (when it was registered after)."""
    rec = self.resolve(output_version)
    entries = [(r["ref"], r["version_id"]) for r in
               self._q("SELECT ref, version_id FROM merge_inputs WHERE merge_id = ? ORDER BY position", (merge_id,))]
    with self._write() as conn:
        if conn.execute("UPDATE merges SET output_version_id = ? WHERE id = ?", (rec.id, merge_id)).rowcount == 0:
            raise AdapterHubError(f"no merge #{merge_id}")
        _link(conn, merge_id, rec.id, entries)


def merge(self, merge_id: int) -> dict:
    """One merge as plain data: method, inputs with weights, params, output, recipe."""
    row = self._one("SELECT * FROM merges WHERE id = ?", (merge_id,))
    if row is None:
        raise AdapterHubError(f"no merge #{merge_id}")
    inputs = self._q("SELECT position, ref, version_id, weight FROM merge_inputs WHERE merge_id = ? "
                     "ORDER BY position", (merge_id,))
    out_ref = None
    if row["output_version_id"] is not None:
        o = self._one("SELECT name, version FROM versions WHERE id = ?", (row["output_version_id"],))
        out_ref = f"{o['name']}@{o['version']}" if o else None
    return {
        "id": row["id"], "created_at": row["created_at"], "method": row["method"],
        "inputs": [{"ref": i["ref"], "weight": i["weight"], "registered": i["version_id"] is not None}
                   for i in inputs],
        "weights": loads(row["weights"], []), "params": loads(row["params"], {}),
        "output": row["output"], "output_version": out_ref, "recipe": loads(row["recipe"], {}),
    }


def merges_for(self, ref) -> dict:
    """{"made_by": [merge...] that produced this version, "used_in": [merge...] that read it}."""
    rec = self.resolve(ref)
    made = [r["id"] for r in self._q("SELECT id FROM merges WHERE output_version_id = ? ORDER BY id", (rec.id,))]
    used = [r["merge_id"] for r in self._q(
        "SELECT DISTINCT merge_id FROM merge_inputs WHERE version_id = ? ORDER BY merge_id", (rec.id,))]
    return {"made_by": [self.merge(i) for i in made], "used_in": [self.merge(i) for i in used]}


def lineage(self, ref, depth: int = 50) -> dict:
    """Parents, children, and every ancestor / descendant (transitively) of a version."""
    rec = self.resolve(ref)

    def walk(start_sql: str) -> list[dict]:
        return self._q(start_sql, (rec.id, depth))

    ancestors = walk(
        "WITH RECURSIVE up(id, ref, d) AS (SELECT parent_id, parent_ref, 1 FROM lineage WHERE child_id = ? "
        "UNION SELECT l.parent_id, l.parent_ref, up.d + 1 FROM lineage l JOIN up ON l.child_id = up.id "
        "WHERE up.d < ?) SELECT ref, min(d) AS depth, id IS NOT NULL AS registered FROM up "
        "GROUP BY ref ORDER BY depth, ref")
    descendants = walk(
        "WITH RECURSIVE down(id, d) AS (SELECT child_id, 1 FROM lineage WHERE parent_id = ? "
        "UNION SELECT l.child_id, down.d + 1 FROM lineage l JOIN down ON l.parent_id = down.id "
        "WHERE down.d < ?) SELECT v.name || '@' || v.version AS ref, min(d) AS depth FROM down "
        "JOIN versions v ON v.id = down.id GROUP BY down.id ORDER BY depth, v.id")
    for a in ancestors:
        a["registered"] = bool(a["registered"])
    return {"ref": rec.ref, "parents": rec.parents, "children": rec.children,
            "ancestors": ancestors, "descendants": descendants}
