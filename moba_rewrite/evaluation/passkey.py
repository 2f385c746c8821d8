"""Passkey retrieval: a key placed at a chosen depth in filler, asked for at the end.

Two formats, one measurement. With a tokenizer the sample is text (the usual "the pass key
is 68217 ... What is the pass key? The pass key is 68217"); without one it is token ids:
filler from the lower half of the vocabulary, then `MARK k1 .. kL` at the needle's depth,
and `MARK k1 .. kL` again at the end, where `MARK` is the last id and key token j is drawn
from the j-th of L equal slices of the upper half. Each key token is then the only token of
its slice before the answer: retrieving it is one content lookup over the whole context
(what a long-range retrieval head does), which a small model learns quickly.

Both ask the same question: given everything before the answer, does the model's greedy
next-token prediction reproduce every answer token? Teacher-forced argmax over the answer
equals greedy generation of it (a wrong token anywhere fails either way), so one forward
per sample is enough. `examples/activate_moba.py` trains on the ids format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from moba_rewrite.evaluation.errors import DataTooShort, EvaluationError

DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_VOCAB = 16  # the ids format needs a filler half, a key half and a marker
FILLER_TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
               "again. ")


@dataclass
class PasskeySample:
    """One prompt: `input_ids` `[T]`; the answer is `input_ids[answer_start:]` (to the end)."""

    input_ids: Tensor
    answer_start: int
    needle_pos: int
    depth: float


def ids_layout(vocab_size: int, key_len: int) -> tuple[range, list[range], int]:
    """(filler ids, one id range per key token, marker id) of the ids format."""
    half = vocab_size // 2
    width = (vocab_size - 1 - half) // max(key_len, 1)
    if vocab_size < MIN_VOCAB or width < 2:
        raise EvaluationError("--tasks passkey", f"expected a vocabulary of at least {max(MIN_VOCAB, 2 + 4 * key_len)} "
                                                 f"ids for a {key_len}-token passkey, got {vocab_size}")
    return range(0, half), [range(half + j * width, half + (j + 1) * width) for j in range(key_len)], vocab_size - 1


def needle_position(length: int, needle_len: int, question_len: int, depth: float, start: int = 0) -> int:
    """Where the needle starts: `depth` 0 right after `start`, 1 right before the question."""
    room = length - question_len - needle_len - start
    return start + int(round(min(max(depth, 0.0), 1.0) * room))


def ids_sample(vocab_size: int, length: int, depth: float, *, key_len: int = 4,
               generator: torch.Generator | None = None) -> PasskeySample:
    """An ids-format sample of exactly `length` tokens (see the module docstring)."""
    filler, slots, mark = ids_layout(vocab_size, key_len)
    needle_len = 1 + key_len
    if length < 2 * needle_len + 1:
        raise DataTooShort("--passkey-lengths", f"expected at least {2 * needle_len + 1} tokens for a passkey "
                                                f"of {key_len} key tokens, got {length}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    key = torch.stack([torch.randint(r.start, r.stop, (), generator=g) for r in slots])
    ids = torch.randint(filler.start, filler.stop, (length,), generator=g)
    pos = needle_position(length, needle_len, needle_len, depth)
    needle = torch.cat([torch.tensor([mark]), key])
    ids[pos:pos + needle_len] = needle
    ids[length - needle_len:] = needle
    return PasskeySample(ids, length - key_len, pos, depth)


def ids_batch(vocab_size: int, length: int, batch: int, *, key_len: int = 4,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Training batch of ids samples at uniform random depths: (input_ids `[B, T]`, labels with
    -100 everywhere but the answer tokens) for a causal LM's shifted loss."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rows, labels = [], []
    for _ in range(batch):
        s = ids_sample(vocab_size, length, float(torch.rand((), generator=g)), key_len=key_len, generator=g)
        lab = torch.full_like(s.input_ids, -100)
        lab[s.answer_start:] = s.input_ids[s.answer_start:]
        rows.append(s.input_ids)
        labels.append(lab)
    return torch.stack(rows), torch.stack(labels)


def text_sample(tokenizer: Any, length: int, depth: float, *, generator: torch.Generator | None = None
                ) -> PasskeySample:
    """A text-format sample of exactly `length` tokens: BOS (if the tokenizer adds one), filler,
    the needle at `depth`, filler, the question and the 5-digit answer."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    key = str(int(torch.randint(10000, 100000, (), generator=g)))

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" What is the pass key? The pass key is")
    answer = enc(f" {key}")
    unit = enc(FILLER_TEXT)
    fixed = len(bos) + len(needle) + len(question) + len(answer)
    room = length - fixed
    if room < 0 or not unit or not answer:
        raise DataTooShort("--passkey-lengths", f"expected at least {fixed} tokens for the passkey prompt with "
                                                f"this tokenizer, got {length}")
    filler = (unit * (room // max(len(unit), 1) + 1))[:room]
    cut = int(round(min(max(depth, 0.0), 1.0) * room))
    ids = bos + filler[:cut] + needle + filler[cut:] + question + answer
    return PasskeySample(torch.tensor(ids), length - len(answer), len(bos) + cut, depth)


def samples(length: int, depths: Sequence[float], count: int, *, vocab_size: int, tokenizer: Any = None,
            key_len: int = 4, seed: int = 0) -> list[list[PasskeySample]]:
    """`count` samples per depth (`[depth][sample]`), the same for every model given the same seed."""
    out = []
    for di, depth in enumerate(depths):
        row = []
        for i in range(count):
            g = torch.Generator().manual_seed(seed * 1_000_003 + length * 101 + di * 10_007 + i)
            row.append(text_sample(tokenizer, length, depth, generator=g) if tokenizer is not None
                       else ids_sample(vocab_size, length, depth, key_len=key_len, generator=g))
        out.append(row)
    return out


def retrieved(logits: Tensor, sample: PasskeySample) -> bool:
    """Whether greedy decoding from the prompt reproduces the whole answer (teacher-forced argmax)."""
    start = sample.answer_start
    predicted = logits[start - 1:sample.input_ids.numel() - 1].argmax(-1).to(sample.input_ids.device)
    return bool(torch.equal(predicted, sample.input_ids[start:]))
