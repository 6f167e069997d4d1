"""The SQLite registry and blob store (imported as adapterhub_local.registry).

Contract used by merge, trainer and hub:

    open_registry(home: Path | None = None) -> Registry
    Registry.register(adapter_dir, name, *, base_dir=None, base_fingerprint=None,
                      metrics=None, tags=None, aliases=(), note=None, parents=(),
                      provenance=None) -> VersionRecord   (record.is_new tells a re-register)
    Registry.resolve(ref) -> VersionRecord          # name, name@3, name:prod
    Registry.adapter_path(record_or_ref) -> Path    # verified PEFT folder for that version
    Registry.log_metrics(ref, {key: value}, step=None, split=None)
    Registry.record_merge(inputs, weights, method, params, output, recipe,
                          output_version=None) -> int
    Registry.set_hub(ref, repo_id, revision, commit_id)

Beyond it: list(...), set_alias / remove_alias, export, rm, gc, verify, lineage,
merges_for, merge(id), set_merge_output, find_by_content, base_models, and for `adapters
sync`: record_metadata (a version without weights), find_origin, alias_sources.
A version's ``weights`` is "present" or "metadata" (recorded by sync, not downloaded):
adapter_path and export raise WeightsNotDownloaded for the latter.
"""

from .blobs import BlobCorrupt, sha256_file
from .common import WeightsNotDownloaded
from .core import PROVENANCE_NAME, Registry, open_registry
from .query import BadQuery, parse_pairs, parse_where
from .records import VersionRecord

__all__ = [
           "PROVENANCE_NAME",
           "BadQuery",
           "BlobCorrupt",
           "Registry",
           "VersionRecord",
           "WeightsNotDownloaded",
           "open_registry",
           "parse_pairs",
           "parse_where",
           "sha256_file",
]
