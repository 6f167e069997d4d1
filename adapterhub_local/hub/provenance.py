"""``adapterhub.json``: the machine-readable provenance in every pushed repo.

Written by push, read back by pull (so lineage and fingerprints survive a round trip
through the Hub). The content is a pure function of what is pushed: no timestamps of
the push itself, so pushing the same thing twice produces the same bytes and the Hub
sees nothing to commit.
"""

from __future__ import annotations

import json

from .. import __version__
from ..errors import AdapterHubError

PROVENANCE_NAME = "adapterhub.json"
FORMAT = "adapterhub-local/provenance"
FORMAT_VERSION = 1


def _record_dict(record) -> dict | None:
    if record is None:
        return None
    keys = ("id", "name", "version", "ref", "created_at", "rank", "alpha", "targets", "aliases", "tags", "note")
    out = {k: getattr(record, k, None) for k in keys}
    return {k: v for k, v in out.items() if v not in (None, [], {})}


def build_provenance(src, base_hub_id: str | None = None) -> dict:
    """The adapterhub.json dict for a resolved Source."""
    from .source import recipe_inputs

    record = src.record
    parents = list(getattr(record, "parents", None) or [])
    if not parents and src.recipe:
        parents = [str(i["ref"]) for i in recipe_inputs(src.recipe) if i.get("ref")]
    if not parents:
        parents = list(src.local_provenance.get("parents") or [])
    children = list(getattr(record, "children", None) or [])
    metrics = dict(getattr(record, "metrics", None) or {})
    prov: dict = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "adapterhub-local", "version": __version__},
        "kind": "adapter" if src.is_adapter else "merged_model",
        "base": {
            "fingerprint": src.base_fingerprint,
            "name_or_path": src.base_name,
            "hub_id": base_hub_id,
        },
        "registry": _record_dict(record),
        "lineage": {
            "parents": parents,
            "children": children,
            "inputs": recipe_inputs(src.recipe),
        },
        "recipe": src.recipe,
        "metrics": metrics,
        "files": dict(sorted(src.files.items())),
    }
    if src.is_adapter and src.adapter_summary:
        s = src.adapter_summary
        prov["adapter"] = {
            "peft_type": s.get("peft_type"), "task_type": s.get("task_type"), "r": s.get("r"),
            "lora_alpha": s.get("lora_alpha"), "ranks": s.get("ranks"), "use_rslora": s.get("use_rslora"),
            "targets": s.get("targets"), "num_modules": s.get("num_modules"),
            "trainable_parameters": s.get("trainable_parameters"),
        }
    if not src.is_adapter:
        prov["model"] = {
            "fingerprint": src.model_fingerprint,
            "architecture": (src.config.get("architectures") or [None])[0],
            "model_type": src.config.get("model_type"),
        }
    rec_prov = getattr(record, "provenance", None)
    if rec_prov:
        prov["registry_provenance"] = rec_prov
    return prov


def dumps(prov: dict) -> str:
    return json.dumps(prov, indent=2, sort_keys=True, default=str) + "\n"


def parse_provenance(text: str | bytes, where: str = PROVENANCE_NAME) -> dict:
    """Read an adapterhub.json; a file that is not ours is an error, not silently ignored."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterHubError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterHubError(f"{where}: not an adapterhub-local provenance file")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterHubError(f"{where}: written by a newer adapterhub-local (format {data['format_version']})",
                              "upgrade adapterhub-local")
    return data
