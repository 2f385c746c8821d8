"""The `triton` backend: fused GPU kernels for MoBA (gate with fused top-k, block-sparse
attention forward and backward, decode, packed variable-length batches).

- `backend`: the backend's entry points (`forward`, `backward`, `supports`), autograd-free
  host code that plans and launches the kernels;
- `gate`: block means and the gate + running top-k kernels, routing (`Selection`);
- `attn`: forward (single and two pass), backward and decode kernels;
- `layout`: problem description (dense or varlen), launch helpers, tracing checks;
- `configs`: launch configs (`MOBA_TRITON_CONFIG` overrides);
- `interp_compat`: fixes that let the kernels run under `TRITON_INTERPRET=1` on the CPU.

May import: torch, triton, `moba_rewrite.kernels.eager` and modules of this package.
"""
