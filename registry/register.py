"""`register`: validate, check against the base, store blobs, then one transaction of rows."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterHubError, InvalidAdapter, ShapeMismatch
from ..provenance import read as read_provenance
from .common import (
    adapter_files,
    check_name,
    content_hash,
    insert_next_version,
    normalize_fingerprint,
    now,
)
from .query import check_metrics
from .records import VersionRecord, dumps, loads

# Tensor names a tied lm_head falls back to when the checkpoint has no lm_head.weight.
_TIED_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def base_shapes(model_dir: Path) -> dict[str, list[int]]:
    """{tensor name: shape} over every shard, from the headers only."""
    from ..fingerprint import model_files
    from ..safetensors_io import read_header

    shapes: dict[str, list[int]] = {}
    for f in model_files(Path(model_dir)):
        tensors, _ = read_header(f)
        shapes.update({name: list(t.shape) for name, t in tensors.items()})
    return shapes


def _find(shapes: dict[str, list[int]], key: str) -> str | None:
    if key in shapes:
        return key
    # the base may be saved with or without its wrapper prefix (model., transformer.)
    cands = [k for k in shapes if k.endswith("." + key) or key.endswith("." + k)]
    if len(cands) == 1:
        return cands[0]
    if key.rsplit(".", 2)[-2:] == ["lm_head", "weight"] or key == "lm_head.weight":
        tied = [k for k in shapes if k.endswith(_TIED_EMBEDDINGS)]
        if len(tied) == 1:
            return tied[0]
    return None


def check_shapes(adapter, shapes: dict[str, list[int]], where: str) -> None:
    """Every adapted module's delta and every saved module must fit the base exactly."""
    for name, m in adapter.modules.items():
        key = _find(shapes, m.weight_key)
        if key is None:
            raise AdapterHubError(f"{where}: module {name} is not in the base model (no tensor "
                                  f"{m.weight_key})", "this adapter was trained for a different base model")
        if tuple(shapes[key]) != tuple(m.delta_shape):
            raise ShapeMismatch(name, shapes[key], m.delta_shape, where)
        if m.bias is not None:
            bkey = _find(shapes, m.bias_key)
            if bkey is not None and tuple(shapes[bkey]) != tuple(m.bias.shape):
                raise ShapeMismatch(m.bias_key, shapes[bkey], m.bias.shape, where)
    for key, t in adapter.extra.items():
        bkey = _find(shapes, key)
        if bkey is None:
            raise AdapterHubError(f"{where}: saved module tensor {key} is not in the base model",
                                  "this adapter was trained for a different base model")
        if tuple(shapes[bkey]) != tuple(t.shape):
            raise ShapeMismatch(key, shapes[bkey], t.shape, where)


def _base_info(self, base_dir=None, base_fingerprint=None, adapter=None, where="", progress=False):
    """(fingerprint or None, base_models row to upsert or None); checks shapes when it can."""
    if base_dir is not None:
        from ..fingerprint import fingerprint_model

        fp = fingerprint_model(base_dir, progress=progress)
        shapes = base_shapes(Path(base_dir))
        if base_fingerprint is not None and normalize_fingerprint(base_fingerprint) != fp.fingerprint:
            from ..errors import BaseMismatch

            raise BaseMismatch(normalize_fingerprint(base_fingerprint), fp.fingerprint)
        if adapter is not None:
            check_shapes(adapter, shapes, where)
        row = {
            "fingerprint": fp.fingerprint, "name_or_path": fp.name_or_path,
            "source": str(Path(base_dir).resolve()), "architecture": fp.architecture,
            "model_type": fp.model_type, "dtype": fp.dtype, "num_parameters": fp.num_parameters,
            "num_tensors": fp.num_tensors, "total_bytes": fp.total_bytes, "files": dumps(fp.files),
            "shapes": json.dumps(shapes, sort_keys=True), "created_at": now(),
        }
        return fp.fingerprint, row
    if base_fingerprint is not None:
        fp = normalize_fingerprint(base_fingerprint)
        known = self._one("SELECT shapes FROM base_models WHERE fingerprint = ?", (fp,))
        if known and known["shapes"] and adapter is not None:
            check_shapes(adapter, loads(known["shapes"], {}), where)
        return fp, None
    return None, None


def _parent_entry(self, parent) -> tuple[str, int | None]:
    """(readable ref, version id or None) for a lineage edge."""
    if isinstance(parent, VersionRecord):
        return parent.ref, parent.id
    text = str(parent)
    path = Path(text).expanduser()
    if path.is_dir():
        found = self.find_by_content(path)
        return (found[-1].ref, found[-1].id) if found else (str(path.resolve()), None)
    rec = self.resolve(text)
    return rec.ref, rec.id


def register(self, adapter_dir, name: str, *, base_dir=None, base_fingerprint=None,
             metrics: dict | None = None, tags: dict | None = None, aliases=(), note: str | None = None,
             parents=(), provenance: dict | None = None, progress: bool = False) -> VersionRecord:
    """Store a PEFT folder as the next version of ``name`` (see the module docs).

    Registering bytes that are already a version of ``name`` returns that version with
    ``is_new=False``; the metrics, tags and aliases given are applied to it. When that version
    is metadata only (recorded by `adapters sync` with the content hash its Hub repo lists),
    these bytes become its weights: same record, ``filled`` set on the record returned.
    """
    from ..peft_format import check_adapter

    check_name(name)
    aliases = [check_name(a, "alias") for a in ([aliases] if isinstance(aliases, str) else aliases)]
    metrics = check_metrics(metrics)
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    folder = Path(adapter_dir).expanduser()
    adapter = check_adapter(folder)  # every check, no numpy: the factors are header views
    cfg = adapter.config
    base_fp, base_row = self._base_info(base_dir, base_fingerprint, adapter, str(folder), progress)
    parent_entries = [_parent_entry(self, p) for p in parents]
    skipped: list[str] = []
    files = adapter_files(folder, skipped)
    provenance = dict(provenance or {})
    if skipped:
        provenance.setdefault("skipped_files", skipped)
    if "exported" not in provenance:
        described = read_provenance(folder)  # one line naming the file and field if we cannot accept it
        if described is not None:
            provenance["exported"] = described

    # Blobs first: a crash from here on leaves only orphan blobs.
    manifest: dict[str, tuple[str, int]] = {}
    for rel, path in files.items():
        try:
            manifest[rel] = self.blobs.put_file(path)
        except OSError as e:
            raise InvalidAdapter(path, f"cannot read ({e.strerror})") from None
    content = content_hash(manifest)
    size = sum(s for _, s in manifest.values())
    stamp = now()

    with self._write() as conn:
        row = conn.execute("SELECT id FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            adapter_id = conn.execute("INSERT INTO adapters (name, last_version, created_at) VALUES (?, 0, ?)",
                                      (name, stamp)).lastrowid
        else:
            adapter_id = row[0]
        same = conn.execute("SELECT id, tags, weights, base_fingerprint FROM versions WHERE adapter_id = ? AND "
                            "content_sha256 = ? ORDER BY version DESC LIMIT 1", (adapter_id, content)).fetchone()
        filled = False
        if same is not None:
            version_id, is_new = same[0], False
            if tags:
                merged = {**loads(same[1], {}), **tags}
                conn.execute("UPDATE versions SET tags = ? WHERE id = ?", (dumps(merged), version_id))
            if same[2] != "present":
                # a metadata-only version (`adapters sync`) whose recorded content hash these bytes
                # have: they are its weights. Same record, same ref; its base must agree.
                if base_fp and same[3] and base_fp != same[3]:
                    from ..errors import BaseMismatch

                    err = BaseMismatch(same[3], base_fp)
                    err.hint = (f"these bytes are {name}'s metadata-only version recorded for that base; register "
                                "them under another name to record them on this base")
                    raise err
                _store_rows(self, conn, manifest, files, base_row, stamp)
                conn.execute(
                    "UPDATE versions SET weights = 'present', size = ?, base_fingerprint = COALESCE(base_fingerprint, "
                    "?), base_model = ?, rank = ?, alpha = ?, targets = ?, num_parameters = ?, config = ? WHERE id = ?",
                    (size, base_fp, adapter.base_model, cfg.get("r"), cfg.get("lora_alpha"), dumps(adapter.targets()),
                     adapter.num_parameters(), dumps(cfg), version_id))
                conn.executemany(
                    "INSERT INTO version_files (version_id, filename, sha256, size) VALUES (?, ?, ?, ?)",
                    [(version_id, rel, sha, n) for rel, (sha, n) in sorted(manifest.items())])
                filled = True
        else:
            is_new = True
            _store_rows(self, conn, manifest, files, base_row, stamp)
            version_id, _ = insert_next_version(conn, adapter_id, {
                "name": name, "content_sha256": content, "base_fingerprint": base_fp,
                "base_model": adapter.base_model, "rank": cfg.get("r"), "alpha": cfg.get("lora_alpha"),
                "targets": dumps(adapter.targets()), "num_parameters": adapter.num_parameters(),
                "config": dumps(cfg), "size": size, "created_at": stamp, "note": note, "tags": dumps(tags),
                "provenance": dumps(provenance)})
            conn.executemany(
                "INSERT INTO version_files (version_id, filename, sha256, size) VALUES (?, ?, ?, ?)",
                [(version_id, rel, sha, n) for rel, (sha, n) in sorted(manifest.items())])
            conn.executemany(
                "INSERT OR IGNORE INTO lineage (child_id, parent_ref, parent_id) VALUES (?, ?, ?)",
                [(version_id, ref, pid) for ref, pid in parent_entries])
        for key, value in metrics.items():
            conn.execute("INSERT INTO metrics (version_id, key, value, step, split, logged_at) "
                         "VALUES (?, ?, ?, NULL, NULL, ?)", (version_id, key, value, stamp))
            conn.execute("INSERT INTO metric_values (version_id, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT(version_id, key) DO UPDATE SET value = excluded.value",
                         (version_id, key, value))
        for alias in aliases:  # set here (source NULL): `adapters sync` never moves it
            conn.execute("INSERT INTO aliases (adapter_id, alias, version_id, updated_at, source) VALUES (?, ?, ?, ?, "
                         "NULL) ON CONFLICT(adapter_id, alias) DO UPDATE SET version_id = excluded.version_id, "
                         "updated_at = excluded.updated_at, source = NULL", (adapter_id, alias, version_id, stamp))
    rec = self.get(version_id, is_new=is_new)
    rec.filled = filled  # a metadata-only version got its weights (not a dataclass field: not in to_dict)
    return rec


def _store_rows(self, conn, manifest: dict, files: dict, base_row: dict | None, stamp: str) -> None:
    """The blob rows (and the base's row) a version's files need, inside the write transaction."""
    # gc may have removed a blob we found already present: write it again under the lock.
    for rel, (sha, n) in manifest.items():
        if not self.blobs.exists(sha):
            self.blobs.put_file(files[rel], expected=sha)
        conn.execute("INSERT OR IGNORE INTO blobs (sha256, size, created_at) VALUES (?, ?, ?)", (sha, n, stamp))
    if base_row is not None:
        cols = ", ".join(base_row)
        conn.execute(
            f"INSERT INTO base_models ({cols}) VALUES ({', '.join('?' * len(base_row))}) "
            "ON CONFLICT(fingerprint) DO UPDATE SET source = excluded.source, "
            "shapes = excluded.shapes, files = excluded.files", tuple(base_row.values()))
