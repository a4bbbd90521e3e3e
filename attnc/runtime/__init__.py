"""The runtime: `compile` → `CompiledAttention`, input validation, dispatch, the custom op, the reference."""
