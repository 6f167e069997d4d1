"""Numbered schema migrations, in sqlite-utils' ``Migrations`` format. Never edit an applied
step: add ``m00N_...`` below it. A step gets the plain sqlite3 connection and runs SQL only
(``_run(db, sql)`` / ``db.execute``).

Plain tables, readable column names, JSON in TEXT columns named for what they hold,
so the db opens as it is in Datasette or the sqlite3 shell.
"""

from __future__ import annotations

import datetime


class _Steps:
    """The numbered steps, in order, in sqlite-utils' migrations format: the table
    ``_sqlite_migrations`` (id, migration_set, name, applied_at) with a unique
    (migration_set, name) index, laid out exactly as ``sqlite_utils.Migrations`` lays it out, so
    `sqlite-utils migrate` and Datasette read our set as applied (a test checks it) and a
    registry made by earlier versions, which ran the steps through sqlite-utils, reads the same.
    We run the steps ourselves: importing sqlite_utils imports numpy, about 0.15 s of a new
    registry's start-up for four CREATE statements."""

    name = "adapterhub-local"
    migrations_table = "_sqlite_migrations"  # sqlite_utils.Migrations.migrations_table

    def __init__(self) -> None:
        self.steps: list = []

    def __call__(self):
        def add(fn):
            self.steps.append(fn)
            return fn
        return add

    def applied(self, conn) -> list[str]:
        """Our applied steps' names in the order applied, read as ``Migrations.applied`` reads them."""
        t = self.migrations_table
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (t,)).fetchone():
            return []
        return [r[0] for r in conn.execute(f"SELECT name FROM {t} WHERE migration_set = ? ORDER BY rowid",
                                           (self.name,))]

    def apply(self, conn) -> list[str]:
        """Run the pending steps on the plain sqlite3 connection ``conn``, each in one write
        transaction with the record of it (a failing step leaves no trace and stays pending).
        The caller holds the migrate lock; pending steps are re-read inside each transaction,
        so a step another process applied meanwhile is not run twice. Returns what ran."""
        t = self.migrations_table
        ran = []
        for fn in self.steps:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"CREATE TABLE IF NOT EXISTS [{t}] (\n   [id] INTEGER PRIMARY KEY,\n"
                             "   [migration_set] TEXT,\n   [name] TEXT,\n   [applied_at] TEXT\n)")
                conn.execute(f"CREATE UNIQUE INDEX IF NOT EXISTS [idx_{t}_migration_set_name] "
                             f"ON [{t}] ([migration_set], [name])")
                done = conn.execute(f"SELECT 1 FROM {t} WHERE migration_set = ? AND name = ?",
                                    (self.name, fn.__name__)).fetchone()
                if not done:
                    fn(conn)
                    stamp = str(datetime.datetime.now(datetime.timezone.utc))
                    conn.execute(f"INSERT INTO {t} (migration_set, name, applied_at) VALUES (?, ?, ?)",
                                 (self.name, fn.__name__, stamp))
                    ran.append(fn.__name__)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return ran


migrations = _Steps()


def _run(db, sql: str) -> None:
    for stmt in (s.strip() for s in sql.split(";")):
        if stmt:
            db.execute(stmt)


@migrations()
def m001_initial(db) -> None:
    _run(db, """
    CREATE TABLE base_models (
        fingerprint TEXT PRIMARY KEY,          -- sha256 over tensors (name, dtype, shape, bytes)
        name_or_path TEXT,                     -- config _name_or_path, else the folder
        source TEXT,                           -- folder it was fingerprinted from
        architecture TEXT,
        model_type TEXT,
        dtype TEXT,
        num_parameters INTEGER,
        num_tensors INTEGER,
        total_bytes INTEGER,
        files TEXT,                            -- JSON {file name: plain sha256}
        shapes TEXT,                           -- JSON {tensor name: shape}, for shape checks
        created_at TEXT NOT NULL
    );
    CREATE TABLE adapters (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        last_version INTEGER NOT NULL DEFAULT 0,   -- numbers are never reused, even after rm
        created_at TEXT NOT NULL
    );
    CREATE TABLE blobs (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY,
        adapter_id INTEGER NOT NULL REFERENCES adapters(id),
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        content_sha256 TEXT NOT NULL,           -- sha256 over the sorted (file, sha256) list
        base_fingerprint TEXT,
        base_model TEXT,                        -- base_model_name_or_path from the config
        rank INTEGER,
        alpha REAL,
        targets TEXT,                           -- JSON list of short module names
        num_parameters INTEGER,
        config TEXT,                            -- JSON: adapter_config.json as registered
        size INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        note TEXT,
        tags TEXT,                              -- JSON {key: value}
        provenance TEXT,                        -- JSON, free form (trainer, merge, hub)
        UNIQUE (adapter_id, version)
    );
    CREATE INDEX versions_name_version ON versions(name, version);
    CREATE INDEX versions_content ON versions(adapter_id, content_sha256);
    CREATE INDEX versions_content_any ON versions(content_sha256);
    CREATE INDEX versions_base ON versions(base_fingerprint);
    CREATE TABLE version_files (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        filename TEXT NOT NULL,
        sha256 TEXT NOT NULL REFERENCES blobs(sha256),
        size INTEGER NOT NULL,
        PRIMARY KEY (version_id, filename)
    );
    CREATE INDEX version_files_sha256 ON version_files(sha256);
    CREATE TABLE metrics (                      -- every value ever logged
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value REAL NOT NULL,
        step INTEGER,
        split TEXT,
        logged_at TEXT NOT NULL
    );
    CREATE INDEX metrics_version_key ON metrics(version_id, key);
    CREATE TABLE metric_values (                -- the latest value per (version, key): what list filters
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (version_id, key)
    );
    CREATE INDEX metric_values_key_value ON metric_values(key, value);
    CREATE TABLE aliases (
        adapter_id INTEGER NOT NULL REFERENCES adapters(id),
        alias TEXT NOT NULL,
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (adapter_id, alias)
    );
    CREATE INDEX aliases_version ON aliases(version_id);
    CREATE INDEX aliases_alias ON aliases(alias);
    CREATE TABLE merges (
        id INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        method TEXT NOT NULL,
        weights TEXT,                           -- JSON list, one per input
        params TEXT,                            -- JSON {parameter: value}
        output TEXT,                            -- path or ref written
        recipe TEXT,                            -- JSON: enough to run the merge again
        output_version_id INTEGER REFERENCES versions(id) ON DELETE SET NULL
    );
    CREATE INDEX merges_output ON merges(output_version_id);
    CREATE TABLE merge_inputs (
        merge_id INTEGER NOT NULL REFERENCES merges(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        ref TEXT NOT NULL,                      -- name@N, or the path given
        version_id INTEGER REFERENCES versions(id) ON DELETE SET NULL,
        weight REAL,
        PRIMARY KEY (merge_id, position)
    );
    CREATE INDEX merge_inputs_version ON merge_inputs(version_id);
    CREATE TABLE lineage (                      -- parent -> child edges between versions
        child_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        parent_ref TEXT NOT NULL,               -- kept readable after the parent is removed
        parent_id INTEGER REFERENCES versions(id) ON DELETE SET NULL,
        merge_id INTEGER REFERENCES merges(id) ON DELETE SET NULL,
        PRIMARY KEY (child_id, parent_ref)
    );
    CREATE INDEX lineage_parent ON lineage(parent_id);
    CREATE TABLE hub (
        id INTEGER PRIMARY KEY,
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        repo_id TEXT NOT NULL,
        revision TEXT,
        commit_id TEXT,
        pushed_at TEXT NOT NULL
    );
    CREATE INDEX hub_version ON hub(version_id)
    """)


@migrations()
def m002_metric_scan_index(db) -> None:
    # lets `list --where` walk one metric's values newest-first without touching versions rows
    db.execute("CREATE INDEX metric_values_key_version ON metric_values(key, version_id, value)")


@migrations()
def m003_hub_origins_and_claims(db) -> None:
    # A version pulled from a Hub remembers where it came from, and the metrics that came
    # with it are that source's claims: kept apart from metric_values (what was measured
    # here), so `list --sort` never ranks a repo by what it says about itself.
    _run(db, """
    CREATE TABLE origins (
        version_id INTEGER PRIMARY KEY REFERENCES versions(id) ON DELETE CASCADE,
        endpoint TEXT NOT NULL,
        repo_id TEXT NOT NULL,
        version TEXT,                           -- the Hub version tag (v3), never an alias
        commit_id TEXT NOT NULL,
        pulled_at TEXT NOT NULL
    );
    CREATE TABLE claimed_metrics (
        version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value REAL NOT NULL,
        source TEXT NOT NULL,                   -- who claims it: repo_id@v3
        received_at TEXT NOT NULL,
        PRIMARY KEY (version_id, key)
    )
    """)


@migrations()
def m004_metadata_only_versions(db) -> None:
    # `adapters sync ORG` records every version of a team namespace, weights or not: a version
    # may exist as metadata only (no version_files rows, no blobs) until `pull` or `sync
    # --weights` fills it in. Every row that existed before this step holds its weights.
    # aliases.source: NULL for an alias set here; 'ORG/NAME' for one sync took from that Hub
    # repo (sync moves those when the team moves them, never one set here).
    _run(db, """
    ALTER TABLE versions ADD COLUMN weights TEXT NOT NULL DEFAULT 'present'
        CHECK (weights IN ('present', 'metadata'));
    CREATE INDEX versions_metadata_only ON versions(weights) WHERE weights != 'present';
    ALTER TABLE aliases ADD COLUMN source TEXT
    """)


KNOWN = [fn.__name__ for fn in migrations.steps]


def check_ours(conn, path) -> None:
    """Refuse, before anything is written, an SQLite file that holds another application's data.

    Empty (a new registry) or carrying our migration set: ours. Anything else is someone
    else's database: no migrations table is added and its journal mode is left as it is.
    Reads only ``sqlite_master`` and the migrations table, so the file stays byte-identical.
    """
    from ..errors import RegistryError

    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite\\_%' "
        "ESCAPE '\\' ORDER BY name")]
    if not tables:
        return
    table = migrations.migrations_table
    if table in tables:
        sets = {r[0] for r in conn.execute(f"SELECT DISTINCT migration_set FROM {table}")}
        if migrations.name in sets:
            return
        if tables == [table] and not sets:
            return  # another process is creating this registry: it made the table, not yet m001
    shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
    raise RegistryError(f"{path}: an SQLite database that is not an adapterhub-local registry "
                        f"(tables: {shown}); left untouched",
                        "point --registry / $ADAPTERS_HOME at a registry folder, or a new one")
