"""The one registry of problem shapes, shared by tests and benchmarks.

Tiers:
  ``interp`` small enough for the Triton interpreter on a 2-core CPU (odd sizes on purpose);
  ``cpu``    realistic vocabularies, run natively on CPU in tests and CPU benchmarks;
  ``gpu``    the sizes the GPU targets are quoted at (docs/design.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # tokens (rows)
    h: int  # hidden size
    v: int  # vocabulary size
    tier: str

    @property
    def id(self) -> str:
        return f"{self.name}-N{self.n}-H{self.h}-V{self.v}"

    @property
    def naive_logits_bytes(self) -> int:
        return 4 * self.n * self.v


SHAPES: tuple[Shape, ...] = (
    Shape("tiny", 16, 32, 128, "interp"),
    Shape("odd", 37, 96, 1001, "interp"),
    Shape("oddv", 70, 64, 4099, "interp"),
    Shape("smollm-vocab", 64, 96, 49152, "cpu"),
    Shape("cpu-small", 512, 256, 32000, "cpu"),
    Shape("cpu-target", 2048, 512, 65536, "cpu"),
    Shape("qwen-16k", 16384, 4096, 151936, "gpu"),
    Shape("llama3-16k", 16384, 4096, 131072, "gpu"),
    Shape("llama3-4k", 4096, 4096, 128256, "gpu"),
    Shape("llama3-8k-h2k", 8192, 2048, 128256, "gpu"),
)


def shapes(tier: str) -> list[Shape]:
    found = [s for s in SHAPES if s.tier == tier]
    if not found:
        raise KeyError(f"no shapes in tier {tier!r}")
    return found


def by_name(name: str) -> Shape:
    for s in SHAPES:
        if s.name == name:
            return s
    raise KeyError(name)
