"""Figures like the paper's, as PNG. matplotlib is an optional extra: without it every function returns None
and the commands print their tables only."""

import io

import numpy as np

from ..io.outputs import write_bytes


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(fig, ax, plt, path, xlabel, ylabel, title=None, legend=True):
    """Label the axes, title, legend, then write the figure (PNG) atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def ratio_histogram(series: dict, path, kind: str = "output"):
    """Distribution of per-token residual ratios (all blocks), one curve per model, medians marked."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    bins = np.linspace(0, 1.2, 61)
    for label, r in series.items():
        r = np.asarray(r).ravel()
        line = ax.hist(
            np.clip(r, 0, 1.2),
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            label=f"{label} (median {np.median(r):.3f})",
        )
        ax.axvline(np.median(r), color=line[2][0].get_edgecolor(), linestyle="--", linewidth=1)
    xlabel = f"residual ratio ({kind}); values above 1.2 shown at 1.2"
    return _finish(fig, ax, plt, path, xlabel, "density", "Residual ratio of every block and token")


def layer_profile(summaries: dict, path):
    """Mean ratio per layer with a +-1 std band, attention and FFN blocks as separate lines."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, summary in summaries.items():
        for kind, style in (("att", "-"), ("ffn", "--")):
            items = [(int(n[1:].split(".")[0]), s) for n, s in summary["blocks"].items() if n.endswith(kind)]
            if not items:
                continue
            layers = np.array([i for i, _ in items])
            mean = np.array([s["mean"] for _, s in items])
            std = np.array([s["std"] for _, s in items])
            (line,) = ax.plot(layers, mean, style, marker="o", markersize=3, label=f"{label} {kind}")
            ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finish(fig, ax, plt, path, "layer", "residual ratio (mean +- std)", "Residual ratio by layer")


def median_by_size(points: dict, path):
    """The paper's curve: median residual ratio (attention, FFN, all blocks) against parameters, log scale.
    `points`: label -> (parameters, {"overall": median, "att": median, "ffn": median})."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    order = sorted(points.items(), key=lambda kv: kv[1][0])
    params = [p for _, (p, _) in order]
    for key, style in (("overall", "-o"), ("att", "--s"), ("ffn", ":^")):
        ax.plot(params, [m[key] for _, (_, m) in order], style, markersize=4, label=key if key != "overall" else "all")
    for label, (p, m) in order:
        ax.annotate(label, (p, m["overall"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    title = "Median residual ratio against model size"
    return _finish(fig, ax, plt, path, "parameters", "median residual ratio", title)


def routing_trace(keep: np.ndarray, names: list, path, title: str = "Routing trace"):
    """Tokens x blocks: dark = executed, light = skipped."""
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.colors import ListedColormap

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = ListedColormap(["#f0f0f0", "#23395d"])  # skipped, executed
    ax.imshow(keep.T.astype(float), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("token")
    ax.set_title(f"{title} (dark: executed, light: skipped)")
    return _save(fig, plt, path)


def depth_histogram(hists: dict, path):
    """How many blocks each token executed, one series per setting."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.8 / max(1, len(hists))
    for j, (label, counts) in enumerate(hists.items()):
        counts = np.asarray(counts, np.float64)
        offset = (j - (len(hists) - 1) / 2) * width  # the group of bars centred on its depth
        ax.bar(np.arange(len(counts)) + offset, counts / counts.sum(), width=width, label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finish(fig, ax, plt, path, "blocks executed per token (dynamic depth)", "fraction of tokens")


def ppl_vs_depth(curves: dict, n_blocks: int, path, ymax: float | None = None):
    """Perplexity against mean blocks per token; `curves` maps a label to (depths, ppls). The perplexity axis is
    logarithmic when the values shown span more than 10x; `ymax` cuts it off (curves leave the plot above it)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, (depth, ppl) in curves.items():
        order = np.argsort(depth)
        ax.plot(np.asarray(depth)[order], np.asarray(ppl)[order], marker="o", markersize=4, label=label)
    shown = [p for _, ppl in curves.values() for p in ppl if p is not None and (ymax is None or p <= ymax)]
    if shown and max(shown) > 10 * min(shown):
        ax.set_yscale("log")
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.invert_xaxis()
    ylabel = "perplexity" + (" (log scale)" if ax.get_yscale() == "log" else "")
    return _finish(
        fig, ax, plt, path, f"mean blocks per token (of {n_blocks})", ylabel, "Quality against dynamic depth"
    )


def training_curve(records: list, path):
    """Training loss (smoothed) and validation losses against step, from the trainer's log.jsonl records."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    window = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, label=f"train (mean of {window} steps)", linewidth=1.2)
    for key in sorted({k for r in records for k in r if k.startswith("val_")}):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), marker="o", markersize=3, label=key.replace("val_", "validation: "))
    return _finish(fig, ax, plt, path, "step", "cross-entropy (nats per token)", "Training")
