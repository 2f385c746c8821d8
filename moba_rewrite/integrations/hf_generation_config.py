"""What a model's generation config makes `generate()` do to the logits beyond the argmax.

Checkpoints often ship a `generation_config.json` with logits processing: Qwen2.5's
`repetition_penalty`, BART's `forced_eos_token_id`, Whisper's suppressed tokens. `generate()`
applies them even when decoding greedily. Code of ours that decodes by its own loop (sharded-cache
decoding, generation artifacts) must either apply them, route through `generate()`, or say that
it does not; this module names them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# generation-config settings with which transformers' `generate()` processes the logits (forced
# tokens, penalties, suppressed tokens, ...) beyond the sampling warpers (temperature, top-k, top-p)
PROCESSING_FIELDS = ("forced_bos_token_id", "forced_eos_token_id", "repetition_penalty", "encoder_repetition_penalty",
                     "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length",
                     "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                     "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale",
                     "watermarking_config", "forced_decoder_ids", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p")


def logits_processing(model: nn.Module) -> dict[str, Any]:
    """The settings of `model.generation_config` that make `generate()` process the logits, with
    their values (empty: greedy `generate()` is the plain argmax of the model's logits)."""
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    default = GenerationConfig()
    out = {}
    for name in PROCESSING_FIELDS:
        value = getattr(config, name, None)
        if value is not None and value != getattr(default, name, None):
            out[name] = value
    return out


def describe(settings: dict[str, Any]) -> str:
    """`repetition_penalty=1.05, no_repeat_ngram_size=2` (long values cut)."""
    return ", ".join(f"{k}={str(v)[:40]}" for k, v in settings.items())
