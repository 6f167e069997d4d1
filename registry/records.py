"""What the registry hands back: plain dataclasses, JSON-ready through ``to_dict``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class VersionRecord:
    id: int
    name: str
    version: int
    base_fingerprint: str | None
    rank: int | None
    alpha: float | None
    targets: list[str]
    config: dict
    files: dict[str, str]  # file name -> sha256 (its blob)
    size: int
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    provenance: dict = field(default_factory=dict)
    hub: list[dict] = field(default_factory=list)
    is_new: bool = True
    content_sha256: str = ""
    base_model: str | None = None  # base_model_name_or_path from the adapter config
    num_parameters: int | None = None
    file_sizes: dict[str, int] = field(default_factory=dict)
    origin: dict | None = None  # pulled from a Hub: {endpoint, repo_id, version, commit_id, pulled_at}
    claims: dict[str, float] = field(default_factory=dict)  # metrics its source claims (not measured here)
    claims_source: str | None = None
    # "present", or "metadata": recorded by `adapters sync` from its Hub repo, weights not
    # downloaded (no files, no blobs) until `adapters pull` or `sync --weights` fills it in
    weights: str = "present"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def has_weights(self) -> bool:
        return self.weights == "present"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ref"] = self.ref
        return d


def loads(value, default):
    if value is None or value == "":
        return default
    try:
        return json.loads(value)
    except ValueError:
        return default


def _clean(value):
    """JSON-safe: NaN/inf become null (SQLite's JSON functions reject them), tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    return value


def dumps(value) -> str | None:
    """JSON for a TEXT column; anything not JSON-native (paths, dtypes) is stored as its str()."""
    if value is None:
        return None
    return json.dumps(_clean(value), sort_keys=True, allow_nan=False, default=str)


def record_from_row(row: dict, files: list[dict] | None = None) -> VersionRecord:
    files = files or []
    return VersionRecord(
        id=row["id"], name=row["name"], version=row["version"],
        base_fingerprint=row["base_fingerprint"], rank=row["rank"], alpha=row["alpha"],
        targets=loads(row["targets"], []), config=loads(row["config"], {}),
        files={f["filename"]: f["sha256"] for f in files},
        file_sizes={f["filename"]: f["size"] for f in files},
        size=row["size"], created_at=row["created_at"], tags=loads(row["tags"], {}),
        note=row["note"], provenance=loads(row["provenance"], {}),
        content_sha256=row["content_sha256"], base_model=row["base_model"],
        num_parameters=row["num_parameters"], weights=row.get("weights") or "present",
    )
