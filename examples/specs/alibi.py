"""ALiBi with the paper's geometric per-head slopes, causal, in torch SDPA's (batch, heads, seq, dim) layout."""

import attnc
from attnc import mods

spec = attnc.Attention(q_heads=8, qk_dim=64, layout="bhsd", score_mod=mods.alibi(mods.alibi_slopes(8)),
                       mask_mod=mods.causal())
