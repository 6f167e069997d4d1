"""Reading versions back out (checkout, export) and keeping the store honest (rm, gc, verify)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

from ..errors import RegistryError
from .blobs import BlobCorrupt, sha256_file
from .common import PROVENANCE_NAME, WeightsNotDownloaded, now


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def adapter_path(self, rec_or_ref) -> Path:
    """A PEFT folder holding exactly this version's files, every one re-hashed now.

    The folder lives under ``checkouts/<content sha256>/`` in the registry home;
    its files are hard links to the (read-only) blobs, or copies where links fail.
    Treat it as read-only; `export` gives a folder of your own. A metadata-only version
    (recorded by `adapters sync`) raises WeightsNotDownloaded: every reader of weights goes
    through here or `export`.
    """
    rec = self.resolve(rec_or_ref)
    if not rec.has_weights:
        raise WeightsNotDownloaded(rec)
    dest = self.checkouts / rec.content_sha256
    if dest.is_dir():
        ok = True
        for fn, sha in rec.files.items():
            blob = self.blobs.check(sha, rec.file_sizes.get(fn))
            p = dest / fn
            if _same_file(p, blob):
                continue
            if not p.is_file() or sha256_file(p)[0] != sha:
                ok = False
                break
        if ok:
            return dest
        shutil.rmtree(dest, ignore_errors=True)
    self.checkouts.mkdir(parents=True, exist_ok=True)
    tmp = self.checkouts / f".{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        for fn, sha in rec.files.items():
            blob = self.blobs.check(sha, rec.file_sizes.get(fn))
            target = tmp / fn
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)
            except OSError:
                self.blobs.copy_to(sha, target)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process materialised it first: theirs is as good as ours
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def provenance(self, rec) -> dict:
    """The adapterhub.json an export of ``rec`` carries (format 2, written_by "export")."""
    from .. import provenance as prov

    base = self.base_model(rec.base_fingerprint) if rec.base_fingerprint else None
    merges = self.merges_for(rec)
    extra = {"home": str(self.home), "content_sha256": rec.content_sha256, "exported_at": now(),
             "base_model": ({k: base[k] for k in ("name_or_path", "architecture", "dtype", "num_parameters", "files")}
                            if base else None),
             "record_provenance": prov.record_provenance(rec)}
    d = prov.build("adapter", "export", base_fingerprint=rec.base_fingerprint,
                   base_name=(base or {}).get("name_or_path") or rec.base_model, record=rec, parents=rec.parents,
                   children=rec.children, metrics=rec.metrics, files=rec.files,
                   extra={k: v for k, v in extra.items() if v is not None})
    d["lineage"].update(made_by=merges["made_by"], used_in=merges["used_in"])
    return prov.validate(d)


def export(self, ref, out, overwrite: bool = False) -> Path:
    """Write a plain PEFT folder for ``ref`` at ``out`` (atomically), with adapterhub.json."""
    from .. import provenance as prov
    from ..fsutil import atomic_dir, check_output

    rec = self.resolve(ref)
    if not rec.has_weights:
        raise WeightsNotDownloaded(rec)
    out = Path(out).expanduser()
    check_output(out, registry_homes=[self.home])
    if out.exists() and not overwrite:
        raise RegistryError(f"{out}: already exists", "choose another folder, or pass --overwrite")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for fn, sha in rec.files.items():
            self.blobs.copy_to(sha, tmp / fn)  # raises BlobCorrupt, and atomic_dir leaves nothing
        (tmp / PROVENANCE_NAME).write_text(prov.dumps(provenance(self, rec), str(out / PROVENANCE_NAME)))
    return out


def _dependents(self, rec) -> list[str]:
    out = []
    for r in self._q("SELECT DISTINCT i.merge_id, m.output, v.name, v.version FROM merge_inputs i "
                     "JOIN merges m ON m.id = i.merge_id LEFT JOIN versions v ON v.id = m.output_version_id "
                     "WHERE i.version_id = ? ORDER BY i.merge_id", (rec.id,)):
        target = f"{r['name']}@{r['version']}" if r["name"] else str(r["output"])
        out.append(f"merge #{r['merge_id']} (-> {target})")
    for c in rec.children:
        if not any(c in d for d in out):
            out.append(f"{c} (child)")
    return out


def rm(self, ref, force: bool = False) -> dict:
    """Remove one version. Refused while a merge or a child version depends on it,
    unless ``force``; blobs no other version uses are deleted with it."""
    rec = self.resolve(ref)
    deps = _dependents(self, rec)
    if deps and not force:
        more = f" and {len(deps) - 3} more" if len(deps) > 3 else ""
        raise RegistryError(f"{rec.ref} has dependents: {', '.join(deps[:3])}{more}",
                            "--force removes it anyway; their lineage keeps its name")
    freed = 0
    removed_blobs = []
    with self._write() as conn:
        conn.execute("DELETE FROM versions WHERE id = ?", (rec.id,))
        for sha in sorted(set(rec.files.values())):
            if conn.execute("SELECT 1 FROM version_files WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
                continue  # still someone else's
            conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
            # unlink under the write lock: a concurrent register re-checks blob files under it too
            p = self.blobs.path(sha)
            with contextlib.suppress(FileNotFoundError):
                freed += p.stat().st_size
                p.unlink()
                removed_blobs.append(sha)
        if not conn.execute("SELECT 1 FROM versions WHERE content_sha256 = ? LIMIT 1",
                            (rec.content_sha256,)).fetchone():
            shutil.rmtree(self.checkouts / rec.content_sha256, ignore_errors=True)
    return {"removed": rec.ref, "blobs_removed": len(removed_blobs), "bytes_freed": freed, "dependents": deps}


def gc(self, dry_run: bool = False) -> dict:
    """Delete blobs no version references (orphans of crashes, leftovers of rm --force),
    temp files of dead writers, and checkouts of removed versions. Reports bytes freed."""
    report = {"blobs_removed": 0, "temp_files_removed": 0, "checkouts_removed": 0, "bytes_freed": 0,
              "dry_run": dry_run, "removed": []}
    with self._write() as conn:
        referenced = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM version_files")}
        rows = {r[0] for r in conn.execute("SELECT sha256 FROM blobs")}
        on_disk = self.blobs.all_blobs()
        for sha in sorted((rows | set(on_disk)) - referenced):
            p = self.blobs.path(sha)
            size = p.stat().st_size if p.is_file() else 0
            report["blobs_removed"] += 1
            report["bytes_freed"] += size
            report["removed"].append(str(p))
            if not dry_run:
                conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        for t in self.blobs.stale_temps():
            report["temp_files_removed"] += 1
            with contextlib.suppress(OSError):
                report["bytes_freed"] += t.stat().st_size
                report["removed"].append(str(t))
                if not dry_run:
                    t.unlink()
        live = {r[0] for r in conn.execute("SELECT DISTINCT content_sha256 FROM versions")}
        if self.checkouts.is_dir():
            for d in self.checkouts.iterdir():
                stale_tmp = d.name.startswith(".") and not _writer_alive(d.name)
                if (not d.name.startswith(".") and d.name not in live) or stale_tmp:
                    report["checkouts_removed"] += 1
                    report["removed"].append(str(d))
                    if not dry_run:
                        shutil.rmtree(d, ignore_errors=True)
    return report


def _writer_alive(name: str) -> bool:
    from .blobs import _pid_alive

    pid = name.lstrip(".").split("-", 1)[0]
    return pid.isdigit() and _pid_alive(int(pid))


def verify(self, ref=None) -> dict:
    """Re-hash blobs and check every row against them.

    Returns {"ok": bool, "problems": [...], "orphans": [...], ...}. Problems are rows
    pointing at missing or altered blobs, or a damaged database; orphans (blobs no
    row uses, temp files of dead writers) are reported but are not problems: `gc`
    removes them. Metadata-only versions (`adapters sync` without --weights) have no files
    to check: they are listed under ``metadata_only``, not as problems.
    """
    problems: list[dict] = []
    orphans: list[str] = []
    if ref is None:
        for (msg,) in self.conn.execute("PRAGMA quick_check").fetchall():
            if msg != "ok":
                problems.append({"ref": None, "problem": f"database: {msg}"})
        for r in self.conn.execute("PRAGMA foreign_key_check").fetchall():
            problems.append({"ref": None, "problem": f"database: row {r[1]} of {r[0]} points at a missing {r[2]}"})
        rows = self._q("SELECT v.name, v.version, f.filename, f.sha256, f.size FROM version_files f "
                       "JOIN versions v ON v.id = f.version_id ORDER BY v.name, v.version, f.filename")
        versions = self._one("SELECT count(*) AS n FROM versions")["n"]
        metadata_only = [f"{r['name']}@{r['version']}" for r in self._q(
            "SELECT name, version FROM versions WHERE weights != 'present' ORDER BY name, version")]
    else:
        rec = self.resolve(ref)
        metadata_only = [] if rec.has_weights else [rec.ref]
        rows = [{"name": rec.name, "version": rec.version, "filename": fn, "sha256": sha,
                 "size": rec.file_sizes.get(fn)} for fn, sha in rec.files.items()]
        versions = 1
    checked: dict[str, str | None] = {}  # sha -> problem or None
    nbytes = 0
    from ..progress import bar

    with bar(total=len(rows), desc="verify", unit="file") as pb:
        for r in rows:
            sha = r["sha256"]
            if sha not in checked:
                try:
                    self.blobs.check(sha, r["size"])
                    checked[sha] = None
                    nbytes += r["size"] or 0
                except BlobCorrupt as e:
                    checked[sha] = e.message
            if checked[sha]:
                problems.append({"ref": f"{r['name']}@{r['version']}", "file": r["filename"],
                                 "blob": str(self.blobs.path(sha)), "expected": sha, "problem": checked[sha]})
            pb.update(1)
    if ref is None:
        referenced = set(checked)
        rows_b = {r["sha256"] for r in self._q("SELECT sha256 FROM blobs")}
        on_disk = self.blobs.all_blobs()
        for sha in sorted(rows_b - set(on_disk)):
            if sha in referenced:
                continue  # already reported against its versions
            orphans.append(f"blob row {sha} has no file (unreferenced)")
        for sha in sorted(set(on_disk) - referenced):
            orphans.append(str(on_disk[sha]))
        orphans += [str(t) for t in self.blobs.stale_temps()]
    return {"ok": not problems, "versions": versions, "files": len(rows), "blobs": len(checked),
            "bytes_hashed": nbytes, "problems": problems, "orphans": orphans, "metadata_only": metadata_only}


__all__ = ["RegistryError", "adapter_path", "export", "gc", "provenance", "rm", "verify"]
