"""``adapterhub.json``: one versioned provenance schema, one writer, one reader.

Every folder adapterhub-local produces carries an ``adapterhub.json``: adapter-algebra and
extraction outputs (``adapters merge --into-adapter``, ``extract``), registry exports
(``adapters export``) and everything ``adapters push`` uploads. :func:`write` (or
:func:`dumps`) is the only way one is written; :func:`read` (or :func:`loads`) is the only
way one is read, and it accepts every shape an earlier version wrote:

- format 2 (this module): ``{"format": "adapterhub-local/provenance", "format_version": 2, ...}``;
- format 1, the same minus ``written_by``/``method``/``team``/``source``/``extra``, with a
  ``registry_provenance`` object (written by ``push`` up to 0.1);
- the flat file ``merge``/``extract`` wrote (``{"base_fingerprint", "created_by", "parents",
  "method", "via", "tuned_fingerprint"}``), shape 0;
- ``provenance.json``, which ``export`` wrote beside the adapter (``{"registry": {...,
  "home"}, "base_fingerprint", "base_model", "content_sha256", "exported_at", ...}``).

Older shapes are upgraded to format 2 in memory; what :func:`read` returns always has every
top-level field below. Files come from strangers' Hub repos, so reading is strict: at most
:data:`MAX_BYTES` bytes, nesting at most :data:`MAX_DEPTH` deep, at most :data:`MAX_NODES`
values, every number finite and within ±2^63, every field of the type below, no unknown
top-level field. Any violation is one :class:`ProvenanceError` line naming the file and the
field (``adapterhub.json: metrics.eval_loss: must be a finite number, got NaN``).

Format 2, field by field (``null`` where unknown):

================  ==================================================================
field             meaning
================  ==================================================================
format            ``"adapterhub-local/provenance"``
format_version    ``2``
tool              ``{"name": "adapterhub-local", "version": "0.1.0"}``: who wrote it
written_by        ``"push"``, ``"merge"``, ``"extract"``, ``"export"`` or ``"train"``
kind              ``"adapter"`` (a PEFT folder) or ``"merged_model"`` (full weights)
method            merge method of a merge output (``cat``, ``svd``, ``ties``, ...,
                  ``extract``), else ``null``
base              ``{"fingerprint": "sha256:<64 hex>", "name_or_path", "hub_id"}``: the
                  exact base weights (see fingerprint.py), its path or id as recorded,
                  its Hub id when known
team              ``{"repo_id": "org/name", "version": 7, "metrics": {"v7": {"eval_loss":
                  0.9}}, "aliases": {"prod": "v6"}}``: a team push (hub/team.py): the repo,
                  this content's version N (its Hub tag is ``vN``), metrics logged after
                  each version was pushed, and the alias tags as `remote alias` last set
                  them (hub/refs_cache.py says why they are committed)
source            ``{"repo_id", "commit_id" (40 hex), "revision", "endpoint",
                  "version" ("vN")}``: where a pulled version came from
registry          the local record it was published from: ``{"id", "name", "version",
                  "ref", "created_at", "rank", "alpha", "targets", "aliases", "tags",
                  "note"}`` (only the keys known)
lineage           ``{"parents": [ref], "children": [ref], "inputs": [recipe input],
                  "made_by": [merge], "used_in": [merge]}``
recipe            the merge recipe (``recipe.yaml`` as an object), else ``null``
metrics           ``{"eval_loss": 1.25, ...}``: finite numbers, every metric logged so far
files             ``{"adapter_model.safetensors": "<64 hex sha256>", ...}`` (this file and
                  README.md are not listed)
adapter           for adapters: ``{"peft_type", "task_type", "r", "lora_alpha", "ranks",
                  "use_rslora", "targets", "num_modules", "trainable_parameters"}``
model             for merged models: ``{"fingerprint", "architecture", "model_type"}``
extra             writer-specific facts, free-form JSON (``tuned_fingerprint`` of an
                  extraction, ``exported_at`` and ``content_sha256`` of an export, ...)
================  ==================================================================

A team push fills ``team``, ``base.fingerprint``, ``lineage`` and ``metrics`` (the
metrics when it was pushed; ``team.metrics`` those logged later); a pull records ``source``.
Content is a pure function of what is described (no write timestamps except an export's
``extra.exported_at``), so pushing the same thing twice writes the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from . import __version__
from .errors import AdapterHubError

NAME = "adapterhub.json"
EXPORT_NAME = "provenance.json"  # what `export` wrote up to 0.1: still read, never written
FORMAT = "adapterhub-local/provenance"
FORMAT_VERSION = 2
WRITERS = ("push", "merge", "extract", "export", "train", "convert")
KINDS = ("adapter", "merged_model")

MAX_BYTES = 4 << 20
MAX_DEPTH = 32
MAX_NODES = 200_000
MAX_ABS = 2**63

_FP = re.compile(r"^sha256:[0-9a-f]{64}\Z")  # \Z, not $: "$" lets a trailing newline in
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_COMMIT = re.compile(r"^[0-9a-f]{40}\Z")
_VTAG = re.compile(r"^v[1-9][0-9]{0,8}\Z")
_ALIAS = re.compile(r"^(?![vV][0-9]+\Z)[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # a Hub tag that is no version


class ProvenanceError(AdapterHubError):
    """An adapterhub.json (or provenance.json) we cannot accept; one line: file, field, problem."""

    def __init__(self, where: str, field: str | None, problem: str, hint: str | None = None):
        self.where, self.field, self.problem = where, field, problem
        super().__init__(f"{where}: {field + ': ' if field else ''}{problem}", hint)


# --- the schema: a tiny declarative type language -----------------------------------------

class _T:
    """A type: ``check(value, path, where)`` raises ProvenanceError or returns the value."""

    def __init__(self, name: str, test, desc: str):
        self.name, self.test, self.desc = name, test, desc

    def check(self, v, path: str, where: str):
        if not self.test(v):
            raise ProvenanceError(where, path, f"must be {self.desc}, got {_show(v)}")
        return v


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


STR = _T("str", lambda v: isinstance(v, str), "a string")
INT = _T("int", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
NUM = _T("num", _is_num, "a finite number")
BOOL = _T("bool", lambda v: isinstance(v, bool), "true or false")
ANY = _T("any", lambda v: True, "anything")
FP = _T("fp", lambda v: isinstance(v, str) and bool(_FP.match(v)), "'sha256:' and 64 hex digits")
HEX64 = _T("hex64", lambda v: isinstance(v, str) and bool(_HEX64.match(v)), "64 lowercase hex digits")
COMMIT = _T("commit", lambda v: isinstance(v, str) and bool(_COMMIT.match(v)), "a 40-hex commit id")
VTAG = _T("vtag", lambda v: isinstance(v, str) and bool(_VTAG.match(v)), "a version tag like 'v7'")
ALIAS = _T("alias", lambda v: isinstance(v, str) and bool(_ALIAS.match(v)), "an alias name (not like v7)")
OBJ = _T("obj", lambda v: isinstance(v, dict), "an object")


class Opt:
    def __init__(self, t):
        self.t = t

    def check(self, v, path, where):
        return None if v is None else self.t.check(v, path, where)


class ListOf:
    def __init__(self, t):
        self.t = t

    def check(self, v, path, where):
        if not isinstance(v, list):
            raise ProvenanceError(where, path, f"must be a list, got {_show(v)}")
        return [self.t.check(x, f"{path}[{i}]", where) for i, x in enumerate(v)]


class MapOf:
    """An object of ``t`` values; ``key`` (a _T) checks each key too."""

    def __init__(self, t, key: _T | None = None):
        self.t, self.key = t, key

    def check(self, v, path, where):
        OBJ.check(v, path, where)
        for k in v:
            if self.key is not None and not self.key.test(k):
                raise ProvenanceError(where, f"{path}.{k}", f"key must be {self.key.desc}")
        return {k: self.t.check(x, f"{path}.{k}", where) for k, x in v.items()}


class Obj:
    """An object with known keys; ``closed`` refuses any other key."""

    def __init__(self, fields: dict, closed: bool = True):
        self.fields, self.closed = fields, closed

    def check(self, v, path, where):
        OBJ.check(v, path, where)
        out = {}
        for k, x in v.items():
            t = self.fields.get(k)
            if t is None:
                if self.closed:
                    raise ProvenanceError(where, f"{path}.{k}" if path else k, "unknown field")
                t = ANY
            out[k] = t.check(x, f"{path}.{k}" if path else k, where)
        return out


_BASE = Obj({"fingerprint": Opt(FP), "name_or_path": Opt(STR), "hub_id": Opt(STR)})
_TOOL = Obj({"name": STR, "version": STR})
POSINT = _T("posint", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 10**9,
            "a positive integer")
_TEAM = Obj({"repo_id": Opt(STR), "version": Opt(POSINT), "metrics": Opt(MapOf(MapOf(NUM), key=VTAG)),
             "aliases": Opt(MapOf(VTAG, key=ALIAS))})
_SOURCE = Obj({"repo_id": Opt(STR), "commit_id": Opt(COMMIT), "revision": Opt(STR), "endpoint": Opt(STR),
               "version": Opt(VTAG)})
_REGISTRY = Obj({"id": Opt(INT), "name": Opt(STR), "version": Opt(INT), "ref": Opt(STR),
                 "created_at": Opt(STR), "rank": Opt(INT), "alpha": Opt(NUM), "targets": Opt(ListOf(STR)),
                 "aliases": Opt(ListOf(STR)), "tags": Opt(MapOf(STR)), "note": Opt(STR)})
_LINEAGE = Obj({"parents": ListOf(STR), "children": ListOf(STR), "inputs": ListOf(OBJ),
                "made_by": ListOf(OBJ), "used_in": ListOf(OBJ)})
_ADAPTER = Obj({"peft_type": Opt(STR), "task_type": Opt(STR), "r": Opt(INT), "lora_alpha": Opt(NUM),
                "ranks": Opt(ListOf(INT)), "use_rslora": Opt(BOOL), "targets": Opt(ListOf(STR)),
                "num_modules": Opt(INT), "trainable_parameters": Opt(INT)})
_MODEL = Obj({"fingerprint": Opt(FP), "architecture": Opt(STR), "model_type": Opt(STR)})


class _Choice(_T):
    def __init__(self, choices):
        super().__init__("choice", lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


SCHEMA = Obj({
    "format": _T("format", lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": _T("fv", lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION)),
    "tool": _TOOL, "written_by": Opt(_Choice(WRITERS)), "kind": _Choice(KINDS), "method": Opt(STR),
    "base": _BASE, "team": Opt(_TEAM), "source": Opt(_SOURCE), "registry": Opt(_REGISTRY), "lineage": _LINEAGE,
    "recipe": Opt(OBJ), "metrics": MapOf(NUM), "files": MapOf(HEX64), "adapter": Opt(_ADAPTER),
    "model": Opt(_MODEL), "extra": MapOf(ANY),
})


def _defaults() -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "tool": {"name": "adapterhub-local", "version": __version__}, "written_by": None, "kind": "adapter",
            "method": None, "base": {"fingerprint": None, "name_or_path": None, "hub_id": None}, "team": None,
            "source": None, "registry": None,
            "lineage": {"parents": [], "children": [], "inputs": [], "made_by": [], "used_in": []},
            "recipe": None, "metrics": {}, "files": {}, "adapter": None, "model": None, "extra": {}}


def _show(v) -> str:
    if isinstance(v, _Bad):
        return v.text
    s = json.dumps(v, allow_nan=True, default=str) if not isinstance(v, (dict, list)) else type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


# --- parsing with bounds -------------------------------------------------------------------

class _Bad:
    """A JSON literal we refuse (NaN, Infinity, an integer of absurd length), kept until the
    walk below can say which field holds it."""

    def __init__(self, text: str):
        self.text = text


def _parse_int(s: str):
    return int(s) if len(s) <= 20 else _Bad(s[:20] + "...")


def _parse_const(s: str):
    return _Bad(s)


def _walk(v, path: str, where: str, depth: int, count: list[int]) -> None:
    """Depth, size and number bounds over the whole document, with the path of the culprit."""
    count[0] += 1
    if count[0] > MAX_NODES:
        raise ProvenanceError(where, None, f"more than {MAX_NODES} values")
    if depth > MAX_DEPTH:
        top = re.match(r"[^.\[]*", path).group() or None  # the field it hangs off, not 32 levels of path
        raise ProvenanceError(where, top, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, _Bad):
        raise ProvenanceError(where, path or None, f"must be a finite number, got {v.text}")
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return
    if isinstance(v, (int, float)):
        if not math.isfinite(v) or abs(v) > MAX_ABS:
            raise ProvenanceError(where, path or None, f"must be a finite number within ±2^63, got {_show(v)}")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            _walk(x, f"{path}.{k}" if path else str(k), where, depth + 1, count)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _walk(x, f"{path}[{i}]", where, depth + 1, count)


def _parse(data: bytes | str, where: str):
    if len(data) > MAX_BYTES:
        raise ProvenanceError(where, None, f"larger than {MAX_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = json.loads(text, parse_int=_parse_int, parse_constant=_parse_const)
    except RecursionError:
        raise ProvenanceError(where, None, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProvenanceError(where, None, f"not valid JSON ({str(e).splitlines()[0][:120]})") from None
    _walk(doc, "", where, 0, [0])
    return doc


# --- the shapes earlier versions wrote -----------------------------------------------------

_FLAT_KEYS = {"base_fingerprint", "created_by", "parents", "method", "via", "tuned_fingerprint"}
_EXPORT_KEYS = {"registry", "base_fingerprint", "base_model", "content_sha256", "files", "metrics", "aliases",
                "tags", "note", "lineage", "provenance", "created_at", "exported_at"}


def _fp(v, path: str, where: str):
    """Shape 0 and exports stored fingerprints with or without the prefix, any case."""
    if v is None:
        return None
    STR.check(v, path, where)
    s = v.lower()
    s = s if s.startswith("sha256:") else "sha256:" + s
    return FP.check(s, path, where)


def _tool(created_by, where: str) -> dict:
    if created_by is None:
        return {"name": "adapterhub-local", "version": "unknown"}
    STR.check(created_by, "created_by", where)
    name, _, version = created_by.rpartition(" ")
    return {"name": name or created_by, "version": version if name else "unknown"}


def _from_flat(d: dict, where: str) -> dict:
    out = _defaults()
    method = Opt(STR).check(d.get("method"), "method", where)
    out.update(tool=_tool(d.get("created_by"), where), written_by="extract" if method == "extract" else "merge",
               method=method)
    out["base"]["fingerprint"] = _fp(d.get("base_fingerprint"), "base_fingerprint", where)
    out["lineage"]["parents"] = ListOf(STR).check(d.get("parents") or [], "parents", where)
    for key in ("via", "tuned_fingerprint"):
        if d.get(key) is not None:
            out["extra"][key] = STR.check(d[key], key, where)
    return out


def _from_export(d: dict, where: str) -> dict:
    out = _defaults()
    out["written_by"] = "export"
    reg = Obj({"name": Opt(STR), "version": Opt(INT), "ref": Opt(STR), "home": Opt(STR)}).check(
        d.get("registry") or {}, "registry", where)
    out["registry"] = {k: v for k, v in {
        "name": reg.get("name"), "version": reg.get("version"), "ref": reg.get("ref"),
        "created_at": d.get("created_at"), "aliases": d.get("aliases") or None, "tags": d.get("tags") or None,
        "note": d.get("note")}.items() if v is not None}
    out["base"]["fingerprint"] = _fp(d.get("base_fingerprint"), "base_fingerprint", where)
    base_model = Opt(OBJ).check(d.get("base_model"), "base_model", where) or {}
    out["base"]["name_or_path"] = Opt(STR).check(base_model.get("name_or_path"), "base_model.name_or_path", where)
    lineage = Opt(OBJ).check(d.get("lineage"), "lineage", where) or {}
    out["lineage"].update({k: lineage[k] for k in ("parents", "children", "made_by", "used_in") if k in lineage})
    out["metrics"] = d.get("metrics") or {}
    out["files"] = d.get("files") or {}
    extra = {"home": reg.get("home"), "content_sha256": d.get("content_sha256"), "exported_at": d.get("exported_at"),
             "base_model": base_model or None, "record_provenance": d.get("provenance") or None}
    out["extra"] = {k: v for k, v in extra.items() if v is not None}
    source = (d.get("provenance") or {}).get("source") if isinstance(d.get("provenance"), dict) else None
    if source == "hub":
        out["source"] = _source_from_record_provenance(d["provenance"])
    return out


def _from_v1(d: dict, where: str) -> dict:
    d = dict(d)
    d["format_version"] = FORMAT_VERSION
    d["written_by"] = "push"
    rp = d.pop("registry_provenance", None)
    if rp is not None:
        d.setdefault("extra", {})["registry_provenance"] = rp
        if isinstance(rp, dict) and rp.get("source") == "hub":
            d["source"] = _source_from_record_provenance(rp)
    return d


def _upgrade(doc, where: str) -> dict:
    if not isinstance(doc, dict):
        raise ProvenanceError(where, None, f"must be a JSON object, got {_show(doc)}")
    if "format" in doc:
        if doc["format"] != FORMAT:
            raise ProvenanceError(where, "format", "not an adapterhub-local provenance file")
        fv = doc.get("format_version")
        INT.check(fv, "format_version", where)
        if fv > FORMAT_VERSION:
            raise ProvenanceError(where, "format_version", f"written by a newer adapterhub-local (format {fv})",
                                  "upgrade adapterhub-local")
        if fv == 1:
            return _from_v1(doc, where)
        if fv != FORMAT_VERSION:
            raise ProvenanceError(where, "format_version", f"unknown format {fv}")
        return doc
    if "registry" in doc and isinstance(doc.get("registry"), dict) and set(doc) <= _EXPORT_KEYS:
        return _from_export(doc, where)
    if set(doc) <= _FLAT_KEYS:
        return _from_flat(doc, where)
    unknown = sorted(set(doc) - _FLAT_KEYS - _EXPORT_KEYS)
    raise ProvenanceError(where, unknown[0] if unknown else None, "not an adapterhub-local provenance file")


def validate(prov: dict, where: str = NAME) -> dict:
    """A format-2 dict, every top-level field present and every type checked."""
    OBJ.check(prov, "", where)
    full = {**_defaults(), **prov}
    for key in ("base", "lineage"):
        if isinstance(prov.get(key), dict):
            full[key] = {**_defaults()[key], **prov[key]}
    return SCHEMA.check(full, "", where)


# --- the public face ---------------------------------------------------------------------

def loads(data: bytes | str, where: str = NAME) -> dict:
    """Parse, bound, upgrade and validate one provenance document (any shape ever written)."""
    return validate(_upgrade(_parse(data, where), where), where)


def find(folder: str | os.PathLike) -> Path | None:
    """The provenance file of ``folder``: adapterhub.json, else an old export's provenance.json."""
    for name in (NAME, EXPORT_NAME):
        p = Path(folder) / name
        if p.is_file() or p.is_symlink():  # a symlink is found, then refused by read()
            return p
    return None


def read(path: str | os.PathLike, where: str | None = None) -> dict | None:
    """Read a folder's provenance (None when it has none) or a provenance file. A symlink,
    FIFO or device in its place is refused, not followed (fsutil.open_input)."""
    from .fsutil import open_input

    path = Path(path)
    file = find(path) if path.is_dir() else path
    if file is None:
        return None
    label = where or str(file)
    try:
        with open_input(file) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ProvenanceError(label, None, f"cannot read ({e.strerror or e})") from None
    return loads(data, label)


def dumps(prov: dict, where: str = NAME) -> str:
    """The canonical text of ``prov`` (validated first: we never write what we would refuse)."""
    prov = validate(prov, where)
    text = json.dumps(prov, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    _parse(text, where)  # the same bounds a reader applies
    return text


def write(folder: str | os.PathLike, prov: dict) -> Path:
    """Write ``folder``/adapterhub.json atomically; returns its path."""
    from .fsutil import atomic_write_text

    path = Path(folder) / NAME
    atomic_write_text(path, dumps(prov, str(path)))
    return path


def base_fingerprint(prov: dict | None) -> str | None:
    return ((prov or {}).get("base") or {}).get("fingerprint")


# --- building one ------------------------------------------------------------------------

def record_fields(record) -> dict | None:
    """The ``registry`` object for a registry VersionRecord (duck-typed; None for none)."""
    if record is None:
        return None
    keys = ("id", "name", "version", "ref", "created_at", "rank", "alpha", "targets", "aliases", "tags", "note")
    out = {k: getattr(record, k, None) for k in keys}
    return {k: v for k, v in out.items() if v not in (None, [], {})}


def record_provenance(record) -> dict | None:
    """A registry version's own provenance (trainer config, merge recipe, pull source) for
    ``extra.record_provenance``, minus the provenance files it embeds (``adapterhub``,
    ``exported``): those are described by the other fields, and re-embedding them on every
    export/register or pull/push round would nest deeper each time."""
    rp = {k: v for k, v in (getattr(record, "provenance", None) or {}).items() if k not in ("adapterhub", "exported")}
    return rp or None


def _source_from_record_provenance(rp: dict) -> dict | None:
    if not isinstance(rp, dict) or rp.get("source") != "hub":
        return None
    keys = ("repo_id", "commit_id", "revision", "endpoint", "version")
    return {k: rp[k] for k in keys if isinstance(rp.get(k), str)}


def source_of(record) -> dict | None:
    """Where a registry version was pulled from (its provenance says so, or the export it was
    registered from does), else None."""
    rp = getattr(record, "provenance", None) or {}
    exported = rp.get("exported") if isinstance(rp.get("exported"), dict) else {}
    return _source_from_record_provenance(rp) or exported.get("source")


def build(kind: str, written_by: str, *, base_fingerprint: str | None = None, base_name: str | None = None,
          base_hub_id: str | None = None, method: str | None = None, record=None, parents=(), children=(),
          inputs=(), recipe: dict | None = None, metrics: dict | None = None, files: dict | None = None,
          adapter: dict | None = None, model: dict | None = None, team: dict | None = None,
          source: dict | None = None, extra: dict | None = None) -> dict:
    """A validated format-2 provenance dict. ``record`` (a registry VersionRecord) fills
    ``registry``, and ``source`` when it was pulled; explicit arguments win."""
    prov = _defaults()
    prov.update(kind=kind, written_by=written_by, method=method, recipe=recipe, team=team,
                source=source if source is not None else source_of(record), registry=record_fields(record),
                metrics=dict(metrics or {}), files=dict(sorted((files or {}).items())), adapter=adapter,
                model=model, extra=dict(extra or {}))
    prov["base"] = {"fingerprint": base_fingerprint, "name_or_path": base_name, "hub_id": base_hub_id}
    prov["lineage"].update(parents=[str(p) for p in parents], children=[str(c) for c in children],
                           inputs=list(inputs))
    return validate(json.loads(json.dumps(prov, default=str)))


def adapter_fields(summary: dict | None) -> dict | None:
    """The ``adapter`` object from peft_format.adapter_summary()."""
    if not summary:
        return None
    keys = ("peft_type", "task_type", "r", "lora_alpha", "ranks", "use_rslora", "targets", "num_modules",
            "trainable_parameters")
    return {k: summary.get(k) for k in keys}


__all__ = ["EXPORT_NAME", "FORMAT", "FORMAT_VERSION", "NAME", "ProvenanceError", "adapter_fields",
           "base_fingerprint", "build", "dumps", "find", "loads", "read", "record_fields", "record_provenance",
           "source_of", "validate", "write"]
