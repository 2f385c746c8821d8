"""The picture of an evaluation: passkey accuracy per length and depth for both models (heat
maps), the per-site output error and kept mass, and the mean KL along the window."""

from __future__ import annotations

import os


def draw_eval(doc: dict, path: str | os.PathLike) -> int:
    """Draw the panels the result has data for into `path` (PNG); returns how many were drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [p for p in ("passkey", "sites", "kl_by_position") if p in doc]
    if "passkey" in doc:
        panels.insert(panels.index("passkey") + 1, "passkey_rewritten")
    if not panels:
        raise ValueError("plot: expected at least one of the tasks passkey, sites, kl")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel.startswith("passkey"):
            _passkey(ax, doc["passkey"], "rewritten" if panel.endswith("rewritten") else "original")
        elif panel == "sites":
            _sites(ax, doc["sites"])
        else:
            _kl(ax, doc["kl_by_position"])
    fig.suptitle(f"moba-rewrite eval: {doc['model']}, {doc['seq_len']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=110)
    plt.close(fig)
    return len(panels)


def _passkey(ax, p: dict, which: str) -> None:
    import numpy as np

    grid = np.array(p[which], dtype=float)
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(p["depths"])), [f"{d:.2f}" for d in p["depths"]], fontsize=7)
    ax.set_yticks(range(len(p["lengths"])), [str(n) for n in p["lengths"]], fontsize=7)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("length (tokens)")
    ax.set_title(f"passkey accuracy, {which}", fontsize=9)
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def _sites(ax, sites: list[dict]) -> None:
    layers = [s["layer"] for s in sites]
    err = [s["out_rel_err"] or 0.0 for s in sites]
    kept = [s["kept_mass"] if s["kept_mass"] is not None else 0.0 for s in sites]
    ax.bar([x - 0.2 for x in layers], err, width=0.4, label="out_rel_err")
    ax.bar([x + 0.2 for x in layers], kept, width=0.4, label="kept_mass")
    for s in sites:
        if s["decision"] != "moba":
            ax.text(s["layer"], 0.02, "dense", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("layer (attention site)")
    ax.set_title("MoBA vs dense per site", fontsize=9)
    ax.legend(fontsize=7)


def _kl(ax, bins: list[dict]) -> None:
    ax.step([b["start"] for b in bins] + [bins[-1]["end"]], [b["mean"] for b in bins] + [bins[-1]["mean"]],
            where="post")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("mean KL(original || rewritten)")
    ax.set_title("where the distributions move", fontsize=9)
