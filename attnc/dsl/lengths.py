"""``Q_LEN`` and ``KV_LEN``: the run-time sequence lengths, usable inside mods.

FlexAttention mods cannot see the lengths; attnc's can, which is how `attnc.mods.causal` aligns the diagonal to
the bottom-right corner when ``q_len != kv_len`` (as FlashAttention does).
"""

from attnc.dsl import symbols
from attnc.dsl.proxy import INT, Proxy

Q_LEN = Proxy(symbols.q_len, INT)
KV_LEN = Proxy(symbols.kv_len, INT)
