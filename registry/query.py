"""`list` filters: metric conditions (``eval_loss<1.2``), name globs, base, alias; sorting.

Conditions are parsed into (key, operator, number) and bound as SQL parameters;
nothing a user types is ever pasted into SQL text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import AdapterHubError

OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "=": "=", "==": "=", "!=": "!="}
KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_COND = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_.\-/]*)\s*(?P<op><=|>=|!=|==|=|<|>)\s*(?P<value>[^<>=!\s]\S*)\s*$")
# Applied after whitespace runs are collapsed to one space: a split that can never backtrack
# over a long run of blanks (``\s+and\s+`` on 100k spaces is quadratic).
_AND = re.compile(r" and | ?&& ?", re.IGNORECASE)
# Bounds that keep any --where inside what SQLite can plan: each metric beyond the first
# JOINED_METRICS is a correlated lookup instead of a join (SQLite joins at most 64 tables),
# and the AND chain stays far below SQLite's expression depth of 1000.
MAX_CONDITIONS = 500
MAX_WHERE_CHARS = 100_000
JOINED_METRICS = 32
# Columns of the versions table a condition or a sort may name; anything else is a metric.
COLUMNS = {"rank": "v.rank", "alpha": "v.alpha", "size": "v.size", "version": "v.version",
           "num_parameters": "v.num_parameters"}
SORTS = {"created": "v.id", "name": "v.name", **COLUMNS}


class BadQuery(AdapterHubError):
    pass


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value:g}"


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def parse_where(texts) -> list[Condition]:
    """``["eval_loss<1.2 and acc>=0.8", "rank=8"]`` -> conditions (all must hold)."""
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for text in texts:
        if not isinstance(text, str):
            raise BadQuery(f"condition {text!r} is not text")
        if len(text) > MAX_WHERE_CHARS:
            raise BadQuery(f"a --where of {len(text):,} characters is too long (at most {MAX_WHERE_CHARS:,})")
        for part in _AND.split(" ".join(text.split())):
            m = _COND.match(part)
            if not m:
                raise BadQuery(f"cannot parse condition {_short(part)}",
                               "write KEY OP NUMBER with OP one of < <= > >= = !=, e.g. 'eval_loss<1.2'")
            try:
                value = float(m.group("value"))
            except ValueError:
                raise BadQuery(f"condition {_short(part)}: {_short(m.group('value'), 30)} is not a number") from None
            if math.isnan(value):
                raise BadQuery(f"condition {_short(part)}: NaN never compares")
            out.append(Condition(m.group("key"), OPS[m.group("op")], value))
            if len(out) > MAX_CONDITIONS:
                raise BadQuery(f"more than {MAX_CONDITIONS} --where conditions",
                               "filter in steps, or export with --json and filter there")
    return out


def parse_pairs(items, what: str = "metric", numeric: bool = True) -> dict:
    """``["eval_loss=1.1", "acc=0.8"]`` -> {key: value}; one clear error for bad syntax."""
    out: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise BadQuery(f"bad {what} {item!r}", f"write {what}s as key=value, e.g. eval_loss=1.23")
        if not KEY_RE.match(key):
            raise BadQuery(f"bad {what} name {key!r}", "use letters, digits, _ . - /, starting with a letter")
        if numeric:
            try:
                num = float(value)
            except ValueError:
                raise BadQuery(f"{what} {key}: {value!r} is not a number") from None
            if not math.isfinite(num):
                raise BadQuery(f"{what} {key}: {value!r} is not a finite number")
            out[key] = num
        else:
            out[key] = value
    return out


def check_metrics(metrics: dict | None) -> dict[str, float]:
    out = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not KEY_RE.match(key):
            raise BadQuery(f"bad metric name {key!r}", "use letters, digits, _ . - /, starting with a letter")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # numpy / torch scalars
            except (TypeError, ValueError):
                raise BadQuery(f"metric {key}: {value!r} is not a number") from None
        if not math.isfinite(float(value)):
            raise BadQuery(f"metric {key}: {value!r} is not a finite number")
        out[key] = float(value)
    return out


def build_list_query(*, name: str | None = None, base: str | None = None, alias: str | None = None,
                     where=(), sort: str | None = None, descending: bool | None = None,
                     limit: int | None = 50, latest_only: bool = False) -> tuple[str, list]:
    """SQL + parameters selecting version ids for `list`.

    Metric conditions are joins on metric_values (one per key). The driving join is
    pinned to an index (SQLite has no statistics on a registry nobody ran ANALYZE on,
    and guesses a sort of every match): newest-first walks one metric's
    (key, version_id, value) index backwards and stops after LIMIT matches; a metric
    sort walks (key, value). Other conditions are primary-key lookups.
    """
    conds = parse_where(where) if where else []
    metric_conds = [c for c in conds if c.key not in COLUMNS]
    joins: list[str] = []
    join_params: list = []
    clauses: list[str] = []
    params: list = []
    metric_alias: dict[str, str] = {}
    driver = None  # (metric key, index) that the query walks first, when pinned

    order = "v.id"
    desc = True if descending is None else descending
    if sort:
        key = sort
        if key.startswith("-"):
            key, desc = key[1:], True
        elif descending is None:
            desc = False
        if key in SORTS:
            order = SORTS[key]
        else:
            if not KEY_RE.match(key):
                raise BadQuery(f"cannot sort by {sort!r}", f"sort by a metric or one of: {', '.join(SORTS)}")
            driver = (key, "metric_values_key_value")
    elif metric_conds:
        driver = (metric_conds[0].key, "metric_values_key_version")

    if driver:
        # CROSS JOIN fixes the loop order: SQLite never reorders around it
        metric_alias[driver[0]] = "m0"
        source = (f"FROM metric_values m0 INDEXED BY {driver[1]} CROSS JOIN versions v "
                  "ON v.id = m0.version_id")
        clauses.append("m0.key = ?")
        params.append(driver[0])
        order = "m0.value" if driver[1].endswith("value") else "m0.version_id"
    else:
        source = "FROM versions v"

    def metric(key: str) -> str:
        if key not in metric_alias:
            a = f"m{len(metric_alias)}"
            metric_alias[key] = a
            joins.append(f"{'CROSS ' if driver else ''}JOIN metric_values {a} "
                         f"ON {a}.version_id = v.id AND {a}.key = ?")
            join_params.append(key)
        return metric_alias[key]

    for c in conds:
        if c.key in COLUMNS:
            clauses.append(f"{COLUMNS[c.key]} {c.op} ?")
        elif c.key in metric_alias or len(metric_alias) < JOINED_METRICS:
            clauses.append(f"{metric(c.key)}.value {c.op} ?")
        else:
            # past the join budget: a lookup by primary key; a missing metric is NULL,
            # which no comparison matches, exactly as the inner join would drop the row
            clauses.append(f"(SELECT mx.value FROM metric_values mx WHERE mx.version_id = v.id "
                           f"AND mx.key = ?) {c.op} ?")
            params.append(c.key)
        params.append(c.value)
    if name:
        clauses.append("v.name GLOB ?")
        params.append(name)
    if base:
        clauses.append(
            "(v.base_fingerprint = ? OR v.base_fingerprint GLOB ? OR v.base_fingerprint IN "
            "(SELECT fingerprint FROM base_models WHERE name_or_path = ? OR source = ? "
            "OR name_or_path GLOB ? OR name_or_path GLOB ? OR source GLOB ?))")
        prefix = base if base.startswith("sha256:") else "sha256:" + base
        params += [base, prefix + "*", base, base, base, "*/" + base, "*/" + base]
    if alias:
        # few versions carry a given alias: drive the query from the aliases index
        clauses.append("v.id IN (SELECT a.version_id FROM aliases a WHERE a.alias = ?)")
        params.append(alias)
    if latest_only:
        clauses.append("v.version = (SELECT max(version) FROM versions w WHERE w.adapter_id = v.adapter_id)")
    sql = ["SELECT v.id", source, *joins]
    if clauses:
        sql.append("WHERE " + " AND ".join(clauses))
    sql.append(f"ORDER BY {order} {'DESC' if desc else 'ASC'}" + ("" if order.endswith("id") else ", v.id DESC"))
    if limit is not None and limit > 0:
        sql.append("LIMIT ?")
        params.append(int(limit))
    return " ".join(sql), join_params + params  # joins' ? come before the WHERE clause's
