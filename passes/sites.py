"""What a found attention site carries: the facts a policy decides on and a report shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SiteKind = Literal["sdpa", "manual", "mha"]
MaskKind = Literal["none", "causal", "padding", "causal+padding", "bool", "additive", "unknown"]


@dataclass(frozen=True)
class AttentionSite:
    """One place where a model computes attention.

    `name` is the owning module's fully-qualified name as in `model.named_modules()`
    ("model.layers.0.self_attn"; "" for the root module), `module_class` its class name and
    `layer` the site's ordinal among all attention sites of the model (0-based, in execution
    order). Shape facts are `None` where the graph does not say.
    """

    name: str
    module_class: str
    layer: int
    kind: SiteKind = "sdpa"
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool | None = None
    mask_kind: MaskKind = "none"
    scale: float | None = None
    dropout_p: float = 0.0
    seq_len: int | None = None
    node_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
