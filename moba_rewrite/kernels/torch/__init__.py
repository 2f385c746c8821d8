"""The `torch` backend: memory-efficient MoBA in pure PyTorch (the CPU default, the GPU fallback).

- `blocks`: the backend's entry points (`forward`, `backward`, decode), thread splitting;
- `select`: routing: the chunked gate, top-k, (row, block) pairs sorted by key block;
- `fast`: the exp2 path without a running maximum where scores are provably bounded;
- `online`: the online-softmax path for everything else (float masks, decode, ...).

Never materialises `Tq x Tk` scores or the full gate at long context. May import: torch and
modules of this package.
"""
