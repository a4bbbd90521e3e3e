"""Ready-made mods, one per file; each factory returns a named `Mod` whose docstring states its formula."""

from attnc.mods.alibi import alibi, alibi_slopes
from attnc.mods.causal import causal
from attnc.mods.chunked import chunked
from attnc.mods.document import document
from attnc.mods.mod import Mod, mask_mod, score_mod
from attnc.mods.prefix_lm import prefix_lm
from attnc.mods.relative_bias import relative_bias
from attnc.mods.sliding_window import sliding_window
from attnc.mods.softcap import softcap

__all__ = ["Mod", "alibi", "alibi_slopes", "causal", "chunked", "document", "mask_mod", "prefix_lm",
           "relative_bias", "score_mod", "sliding_window", "softcap"]
