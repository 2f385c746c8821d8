"""Writers for rewritten models: `.pt2` (torch.export), AOTInductor packages and ONNX.

Each module has one job and one entry point (`save_pt2`, `save_aoti`, `save_onnx`); all of
them write atomically through `moba_rewrite.checkpoints.atomic_output`. `generation` exports a
Hugging Face decoder's prefill and decode programs over a static KV cache (pt2 / AOTInductor),
`onnx_generation` writes them as ONNX.
"""
