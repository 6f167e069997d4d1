"""The SQLite registry and blob store (imported as adapterhub_local.registry).

Contract used by merge, trainer and hub (implemented by the registry issue):

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
"""
