"""`KernelConfig`: the schedule of one kernel build (tile sizes, pipeline depth, threads).

Configs are plain frozen values: templates read them, the tuner enumerates them, the tuning database stores them
as JSON, and their canonical form enters every cache key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class KernelConfig:
    """One point of a template's schedule space.

    block_m: query rows per tile; block_n: key rows per tile; stages: software-pipeline depth of the K/V loads;
    threads: threads per block (CUDA) — ignored by the CPU template; pack_gqa: one block serves all q heads of a
    kv group (``block_m`` rows spread over them; the decode family's layout: the forward and backward templates
    run one block per q head and refuse it); split: kv splits for decode kernels (1 = none).
    """

    block_m: int = 64
    block_n: int = 64
    stages: int = 2
    threads: int = 128
    pack_gqa: bool = False
    split: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> KernelConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def short(self) -> str:
        """A compact label, e.g. ``m128n128s2t256``."""
        label = f"m{self.block_m}n{self.block_n}s{self.stages}t{self.threads}"
        if self.pack_gqa:
            label += "g"
        if self.split > 1:
            label += f"x{self.split}"
        return label
