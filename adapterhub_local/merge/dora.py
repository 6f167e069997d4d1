"""DoRA in a streamed merge into a base, as PEFT's merge_and_unload computes it. No torch.

PEFT (peft/tuners/lora/variants.py, DoraLinearVariant.merge_safe / DoraEmbeddingVariant.merge_safe;
peft/tuners/lora/dora.py, DoraLinearLayer.get_weight_norm) merges the adapters of one module
one after another, in the order given. A plain adapter adds its delta; a DoRA adapter i sets

    W ← (mᵢ / ‖W₀ + ΔWᵢ‖) ⊙ (W + ΔWᵢ)

where W₀ is the weight WITHOUT the adapters merged before it (LoraLayer._unmerged_base_weight,
peft/tuners/lora/layer.py), ΔWᵢ = sᵢ·BᵢAᵢ in the base's orientation, and the norm is taken
per output feature: over each row of a Linear weight stored (out, in), so a row block holds
whole norms; over each COLUMN of a weight stored (in, out) (GPT-2 Conv1D, fan_in_fan_out) and
of an embedding (num_embeddings, dim) (DoraEmbeddingLayer: magnitude per embedding dim), so
those take one extra read of the tensor first to sum the column squares. The result therefore
depends on the order of the adapters on the command line, as PEFT's does.

Each ΔWᵢ comes from the same C kernel as a plain merge (an fma chain in rank order),
consecutive plain adapters as one stacked product; everything is float32, squares summed in
float64 (8 lanes in a fixed order: cast.dora_rows_cast, C or numpy, same bits), and the block
is cast once at the end. The usual case, one DoRA adapter on a Linear weight, is two fused
passes: the kernel writes W₀ + ΔW as float32, and dora_rows_cast scales each row (still in
cache) by m/‖row‖ and casts it.
"""

from __future__ import annotations

import numpy as np

from ..errors import AdapterHubError
from ..lora import LoraModule, as_numpy
from .cast import add_cast, dora_rows_cast, lowrank_add_cast, row_norms


def has_dora(deltas) -> bool:
    return any(m.magnitude is not None for m, _ in deltas)


class DoraTensor:
    """The merge of one tensor that has at least one DoRA adapter on it."""

    def __init__(self, name: str, deltas: list[tuple[LoraModule, float]], rows: int, row: int, pack):
        """``pack(mods, transposed)`` -> (left, packed right, rank): stream.py's operand builder for
        the kernel, handed in so this module does not import stream (which imports it)."""
        _stacked_packed = pack
        transposed = {m.transposed for m, _ in deltas}
        if len(transposed) != 1:
            raise AdapterHubError(f"{name}: adapters of both orientations on one DoRA module")
        self.transposed = transposed.pop()
        self.rows, self.row = rows, row
        # segments in command-line order: ("plain", operands) for a run of plain adapters,
        # ("dora", operands, magnitude) for each DoRA adapter
        self.segments: list[tuple] = []
        run: list[tuple[LoraModule, float]] = []
        for m, w in deltas:
            if m.magnitude is None:
                run.append((m, w))
                continue
            if w != 1:
                raise AdapterHubError(f"{name}: DoRA adapter with weight {w:g}; a DoRA merge has no weight",
                                      "give DoRA adapters weight 1 (PEFT merges them whole)")
            if run:
                self.segments.append(("plain", _stacked_packed(run, self.transposed)))
                run = []
            mag = np.ascontiguousarray(as_numpy(m.magnitude), dtype=np.float32).reshape(-1)
            if mag.shape[0] != (row if self.transposed else rows):
                raise AdapterHubError(f"{name}: lora_magnitude_vector has {mag.shape[0]} values for "
                                      f"{row if self.transposed else rows} output features")
            self.segments.append(("dora", _stacked_packed([(m, 1.0)], self.transposed), mag))
        if run:
            self.segments.append(("plain", _stacked_packed(run, self.transposed)))
        self.colsq = [np.zeros(row, dtype=np.float64) if s[0] == "dora" else None for s in self.segments]
        self._zero = np.zeros(0, dtype=np.float32)
        self._t = np.zeros(0, dtype=np.float32)
        self.fast = len(self.segments) == 1 and not self.transposed

    def write(self, src, src_kind: str, r0: int, r1: int, out, out_kind: str) -> int:
        """Rows r0:r1 merged and cast into ``out``; returns the non-finite count."""
        if self.fast:  # one DoRA adapter on a Linear weight: two fused passes
            n = (r1 - r0) * self.row
            if self._t.shape[0] < n:
                self._t = np.empty(n, dtype=np.float32)
            left, packed, rank = self.segments[0][1]
            lowrank_add_cast(src, src_kind, left[r0:r1], packed, rank, self._t[:n], "F32")
            return dora_rows_cast(self._t[:n], r1 - r0, self.segments[0][2][r0:r1], out, out_kind)
        from .cast import to_f32

        base = src if src_kind == "F32" else to_f32(src, src_kind)
        base = base if isinstance(base, np.ndarray) else np.frombuffer(base, dtype=np.float32)
        return add_cast(self.block(base, r0, r1), "F32", None, out, out_kind)

    @property
    def needs_prepass(self) -> bool:
        return self.transposed

    def _delta(self, ops, r0: int, r1: int) -> np.ndarray:
        left, packed, rank = ops
        n = (r1 - r0) * self.row
        if self._zero.shape[0] < n:
            self._zero = np.zeros(n, dtype=np.float32)
        out = np.empty(n, dtype=np.float32)
        lowrank_add_cast(self._zero[:n], "F32", left[r0:r1], packed, rank, out, "F32")
        return out.reshape(r1 - r0, self.row)

    def add_columns(self, base: np.ndarray, r0: int, r1: int) -> None:
        """Pre-pass (column norms): accumulate Σ (W₀ + ΔWᵢ)² over rows r0:r1 of each DoRA column."""
        w0 = base.reshape(r1 - r0, self.row)
        for seg, acc in zip(self.segments, self.colsq):
            if seg[0] == "dora":
                t = w0 + self._delta(seg[1], r0, r1)
                acc += np.einsum("ij,ij->j", t, t, dtype=np.float64)

    def block(self, base: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """The merged float32 rows r0:r1 (before the one cast)."""
        w0 = base.reshape(r1 - r0, self.row)
        acc = w0
        for seg, colsq in zip(self.segments, self.colsq):
            d = self._delta(seg[1], r0, r1)
            if seg[0] == "plain":
                acc = acc + d
                continue
            if self.transposed:
                norm = np.sqrt(colsq).astype(np.float32)
                factor = (seg[2] / norm)[None, :]
            else:
                factor = (seg[2][r0:r1] / row_norms(w0 + d))[:, None]
            with np.errstate(all="ignore"):
                acc = factor * (acc + d)
        return np.ascontiguousarray(acc, dtype=np.float32).reshape(-1)
