"""What a server's loader sees of an adapter and a base: config values, tensor names and
shapes from safetensors headers. No tensor data is read and torch is never imported."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidAdapter, InvalidModel, UnsupportedAdapter
from ..peft_format import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME

_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMB = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")


def safe(text: str) -> str:
    """A name from a file we did not write, cut to a length a message can hold. (Terminal
    escaping happens where text is printed: cli.output.safe_text.)"""
    text = str(text)
    return text if len(text) <= 200 else text[:197] + "..."


def read_safetensors_header(path: Path, error: type = InvalidModel) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors header, validated by the project's reader."""
    from ..safetensors_io import read_header

    infos, _ = read_header(path, error=error)
    return {name: (info.dtype, [int(s) for s in info.shape]) for name, info in infos.items()}


@dataclass
class TensorKind:
    name: str  # as stored
    module: str  # vLLM's module name: the stored name without base_model.model. and the part
    kind: str  # lora | embedding | skipped | dora | lora_bias | bias | whole
    part: str = ""  # A | B for lora and embedding
    shape: list[int] = field(default_factory=list)


def classify(name: str, shape: list[int], skipped_suffixes: tuple[str, ...]) -> TensorKind:
    """Sort one stored tensor name the way vLLM's parse_fine_tuned_lora_name does
    (vllm/lora/utils.py:130-171): only ``<m>.lora_A.weight``, ``<m>.lora_B.weight``,
    ``<m>.lora_embedding_A`` and ``<m>.lora_embedding_B`` are LoRA weights."""
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if any(name.endswith(s) for s in skipped_suffixes):
        return TensorKind(name, short.rsplit(".", 2)[0], "skipped", shape=shape)
    m = _LORA.match(short)
    if m:
        return TensorKind(name, m.group("module"), "lora", m.group("part")[-1], shape)
    m = _EMB.match(short)
    if m:
        return TensorKind(name, m.group("module"), "embedding", m.group("part")[-1], shape)
    if ".lora_magnitude_vector" in short:
        return TensorKind(name, short.split(".lora_magnitude_vector")[0], "dora", shape=shape)
    if short.endswith(".lora_B.bias"):
        return TensorKind(name, short[: -len(".lora_B.bias")], "lora_bias", shape=shape)
    if short.endswith(".bias"):
        return TensorKind(name, short[: -len(".bias")].removesuffix(".base_layer"), "bias", shape=shape)
    return TensorKind(name, short.removesuffix(".weight"), "whole", shape=shape)


@dataclass
class AdapterFacts:
    folder: Path
    config: dict
    tensors: dict[str, tuple[str, list[int]]]

    @classmethod
    def read(cls, folder: str | Path) -> AdapterFacts:
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidAdapter(folder, "not a directory" if folder.exists() else "no such file or directory",
                                 "give the folder holding adapter_config.json")
        # syntax, types and ranges checked; variants are not refused here: they are what a
        # server's rules are about
        from ..adapter_config import read_config

        config = read_config(folder)
        if str(config.get("peft_type", "")).upper() != "LORA":
            raise InvalidAdapter(folder / CONFIG_NAME, f"unknown peft_type {safe(config.get('peft_type'))!r}",
                                 "only LORA adapters are checked")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            if (folder / PICKLE_NAME).is_file():
                raise UnsupportedAdapter(folder / PICKLE_NAME, "pickled weights are not inspected "
                                         "(unpickling can run arbitrary code)",
                                         "save the adapter with safe_serialization=True")
            raise InvalidAdapter(folder, f"no {WEIGHTS_NAME}")
        tensors = read_safetensors_header(weights, error=InvalidAdapter)
        if not tensors:
            raise InvalidAdapter(weights, "contains no tensors")
        return cls(folder, config, tensors)

    def kinds(self, skipped_suffixes: tuple[str, ...] = ()) -> list[TensorKind]:
        return [classify(n, shape, skipped_suffixes) for n, (_, shape) in sorted(self.tensors.items())]

    def module_ranks(self) -> dict[str, int]:
        """Rank of each LoRA module from its A factor's shape (rows)."""
        out: dict[str, int] = {}
        for k in self.kinds():
            if k.kind in ("lora", "embedding") and k.part == "A" and k.shape:
                out[k.module] = int(k.shape[0])
        return out


@dataclass
class BaseFacts:
    path: str
    weights: dict[str, list[int]]  # weight name -> shape
    architectures: list[str]
    vocab_size: int | None

    @classmethod
    def read(cls, base_dir: str | Path) -> BaseFacts:
        from ..fingerprint import model_files

        base_dir = Path(base_dir)
        weights: dict[str, list[int]] = {}
        for f in model_files(base_dir):
            weights.update({n: shape for n, (_, shape) in read_safetensors_header(f).items()})
        cfg: dict = {}
        cfg_path = base_dir / "config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, OSError) as e:
                raise InvalidModel(cfg_path, f"not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise InvalidModel(cfg_path, "expected a JSON object")
        archs = cfg.get("architectures") or []
        archs = [str(a) for a in archs] if isinstance(archs, list) else []
        vocab = cfg.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool):
            text = cfg.get("text_config")
            vocab = text.get("vocab_size") if isinstance(text, dict) else None
            vocab = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None
        return cls(str(base_dir), weights, archs, vocab)

    def modules(self) -> dict[str, list[int]]:
        """Module name -> weight shape, for every 2-D ``.weight`` (what a LoRA can target)."""
        return {n[: -len(".weight")]: s for n, s in self.weights.items() if n.endswith(".weight") and len(s) == 2}


__all__ = ["AdapterFacts", "BaseFacts", "TensorKind", "classify", "safe", "CONFIG_NAME"]
