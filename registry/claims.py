"""Versions pulled from a Hub: where each came from, and the metrics its source claims.

Claims live in their own table, never in ``metric_values``: `list --where/--sort` rank
by what was measured here unless ``--claims`` asks to let the sources' word count too
(``rank_with_claims``), and `show` prints them under their source's name.
"""

from __future__ import annotations

from .query import check_metrics


def set_origin(self, ref, *, endpoint: str, repo_id: str, version: str | None, commit_id: str):
    """Record where a pulled version came from (once: the first pull of these bytes wins)."""
    from .common import now

    rec = self.resolve(ref)
    with self._write() as conn:
        conn.execute("INSERT OR IGNORE INTO origins (version_id, endpoint, repo_id, version, commit_id, pulled_at) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (rec.id, endpoint, repo_id, version, commit_id, now()))
    return self.get(rec.id)


def add_claims(self, ref, metrics: dict, *, source: str):
    """Store what ``source`` claims about a version's metrics (replacing its earlier claim per key)."""
    from .common import now

    metrics = check_metrics(metrics)
    rec = self.resolve(ref)
    with self._write() as conn:
        for key, value in metrics.items():
            conn.execute("INSERT INTO claimed_metrics (version_id, key, value, source, received_at) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT (version_id, key) DO UPDATE SET "
                         "value = excluded.value, source = excluded.source, received_at = excluded.received_at",
                         (rec.id, key, value, source, now()))
    return self.get(rec.id)


def _claims_into(self, by: dict, ids: list[int], marks: str) -> None:
    by["claims"] = {}
    for c in self._q(f"SELECT * FROM claimed_metrics WHERE version_id IN ({marks}) ORDER BY key", ids):
        by["claims"].setdefault(c["version_id"], []).append(c)
    by["origin"] = {}
    for o in self._q(f"SELECT * FROM origins WHERE version_id IN ({marks})", ids):
        by["origin"][o["version_id"]] = {k: o[k] for k in ("endpoint", "repo_id", "version", "commit_id",
                                                           "pulled_at")}


def rank_with_claims(recs: list, where=(), sort: str | None = None, limit: int | None = None) -> list:
    """``list --claims``: filter and sort by local metrics, and by the source's claim where
    nothing was measured here. Runs over the records ``list`` found without metric filters."""
    from .query import COLUMNS, parse_where

    ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           ">=": lambda a, b: a >= b, "=": lambda a, b: a == b, "!=": lambda a, b: a != b}

    def value(r, key):
        if key in COLUMNS or key in ("created", "name"):
            return {"created": r.id, "name": r.name}.get(key, getattr(r, key, None))
        return r.metrics.get(key, r.claims.get(key))

    conds = parse_where(where) if where else []
    out = [r for r in recs if all((v := value(r, c.key)) is not None and ops[c.op](v, c.value) for c in conds)]
    if sort:
        key, desc = (sort[1:], True) if sort.startswith("-") else (sort, False)
        have = [r for r in out if value(r, key) is not None]
        have.sort(key=lambda r: value(r, key), reverse=desc)
        out = have + [r for r in out if value(r, key) is None]
    return out[:limit] if limit else out
