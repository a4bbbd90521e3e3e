"""Backward benchmark: attnc vs cuDNN SDPA, SDPA flash (FA2) and compiled FlexAttention on one GPU.

    python benchmarks/bwd.py [--quick] [--cases causal,softcap] [--out DIR]   (same as: python -m attnc bench --backward)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnc.bench.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--backward", *sys.argv[1:]]))
