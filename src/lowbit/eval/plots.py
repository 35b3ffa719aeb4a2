"""The report's PNG plots (matplotlib, Agg backend: no display, no global style changed).

Each function takes the report dict and a file path and draws one figure on its own Figure
object (never pyplot's global state), so plotting is safe in a library and in tests.
"""

from __future__ import annotations

from pathlib import Path

FIGURES = {"quality_vs_bits": "quality_vs_bits.png", "speed_vs_size": "speed_vs_size.png",
           "layer_error": "layer_error.png"}


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same data, same bytes


def _front_line(ax, rows: list[dict], labels: list[str], key: str) -> None:
    front = [r for r in rows if r["label"] in labels]
    front.sort(key=lambda r: r["bits_per_weight"])
    if len(front) > 1:
        ax.step([r["bits_per_weight"] for r in front], [r[key] for r in front], where="post", color="tab:red",
                linewidth=1.2, alpha=0.7, label="Pareto front")
    ax.scatter([r["bits_per_weight"] for r in front], [r[key] for r in front], s=90, facecolors="none",
               edgecolors="tab:red", linewidths=1.5, zorder=3)


def quality_vs_bits(report: dict, path: Path) -> None:
    """Perplexity and mean KL against bits per weight, the Pareto front marked; the original's
    perplexity as a dashed line (its 16/32 bits would squash the axis)."""
    rows = report["checkpoints"]
    orig, quant = rows[0], rows[1:]
    fig, (ax_p, ax_k) = _figure(10, 4.2, 2)
    for ax, key, title in ((ax_p, "perplexity", "perplexity"), (ax_k, "kl", "mean KL to the original (nats/token)")):
        ax.scatter([r["bits_per_weight"] for r in quant], [r[key] for r in quant], color="tab:blue", zorder=2)
        for r in quant:
            ax.annotate(r["label"], (r["bits_per_weight"], r[key]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        _front_line(ax, quant, report["pareto"]["kl" if key == "kl" else "perplexity"], key)
        ax.set_xlabel("bits per weight (decoder Linears, on disk)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    ax_p.axhline(orig["perplexity"], color="gray", linestyle="--", linewidth=1,
                 label=f"original ({orig['perplexity']:.3f})")
    ax_p.legend(fontsize=8)
    ax_k.set_yscale("log")
    text = report["text"]
    fig.suptitle(f"quality against size — held-out {text['source']}, {text['windows']} × {text['seq_len']} tokens",
                 fontsize=10)
    _save(fig, path)


def speed_vs_size(report: dict, path: Path) -> None:
    """Decode tokens/s against size on disk (MiB), the original included: lowbit's runtime where it runs
    the model, transformers' generate() otherwise."""
    def tok_s(r):
        return r.get("runtime_decode_tokens_per_s") or r.get("decode_tokens_per_s")

    rows = [r for r in report["checkpoints"] if tok_s(r) is not None]
    fig, ax = _figure(6, 4.2)
    if not rows:
        ax.text(0.5, 0.5, "speed not measured (--no-speed)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for r in rows:
        color = "gray" if r["label"] == "original" else "tab:green"
        ax.scatter(r["size_bytes"] / 2**20, tok_s(r), color=color, zorder=2)
        ax.annotate(r["label"], (r["size_bytes"] / 2**20, tok_s(r)), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if rows:
        ax.set_xlabel("size on disk (MiB)")
        ax.set_ylabel("decode tokens/s (batch 1, greedy)")
        ax.grid(alpha=0.3)
        note = report.get("speed") or {}
        ax.set_title(f"decode speed against size ({note.get('threads', '?')} threads"
                     f"{'; machine busy' if note.get('busy') else ''})", fontsize=10)
    _save(fig, path)


def layer_error(report: dict, path: Path) -> None:
    """Each checkpoint's per-layer relative output error, in layer order on a log axis, with the
    4^-b bound of each bit width present."""
    fig, ax = _figure(10, 4.5)
    bounds = set()
    drawn = False
    for label, entry in report["layer_errors"].items():
        layers = entry["layers"]
        if not layers:
            continue
        ys = [v["rel_error"] for v in layers.values()]
        ax.plot(range(len(ys)), ys, marker=".", markersize=3, linewidth=0.8,
                label=f"{label} ({next(iter(layers.values()))['source']})")
        bounds.update(v["bits"] for v in layers.values())
        drawn = True
    for bits in sorted(bounds):
        ax.axhline(4.0 ** -bits, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"4^-{bits}", (0, 4.0 ** -bits), textcoords="offset points", xytext=(2, 3), fontsize=8)
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("decoder Linear (block order: q, k, v, o, gate, up, down per block)")
        ax.set_ylabel("relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.set_title("per-layer error against the 4^-b rate-distortion bound", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no per-layer errors", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    _save(fig, path)


def write_plots(report: dict, folder: Path) -> dict[str, str]:
    """Draw every figure into `folder`; returns {figure: file name}."""
    folder = Path(folder)
    quality_vs_bits(report, folder / FIGURES["quality_vs_bits"])
    speed_vs_size(report, folder / FIGURES["speed_vs_size"])
    layer_error(report, folder / FIGURES["layer_error"])
    return dict(FIGURES)
