"""Benchmarks against the peers (cuDNN and flash SDPA, FlexAttention): cases, timing, FLOP counts, reports."""
