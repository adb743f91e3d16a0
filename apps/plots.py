"""PNG figures for `bench --plot` and `kvp sweep --plot` (matplotlib, no display needed)."""

from pathlib import Path


def _figure(ncols):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path):
    """Write the PNG atomically."""
    import os
    import tempfile

    path = Path(path)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def bench_plot(records, path, title):
    """Two panels: TTFT vs prompt length per strategy; quality vs TTFT (the Pareto view, one
    point per strategy and length): continuation NLL ratio vs exact when measured, else
    first-token agreement. With task accuracy, a third: accuracy relative to full against TTFT
    relative to full, and the Pareto front of those points."""
    has_task = any(r.get("task_relative_accuracy") is not None for r in records)
    plt, fig, axes = _figure(3 if has_task else 2)
    ax1, ax2 = axes[0], axes[1]
    if has_task:
        _task_pareto(axes[2], records)
    use_nll = all(r.get("nll_ratio") is not None for r in records)
    qkey = "nll_ratio" if use_nll else "first_token_agreement"
    for s in dict.fromkeys(r["strategy"] for r in records):
        rows = sorted((r for r in records if r["strategy"] == s), key=lambda r: r["prompt_tokens"])
        x = [r["prompt_tokens"] for r in rows]
        ax1.errorbar(x, [r["ttft_s"] for r in rows], fmt="o-", label=s, capsize=3,
                     yerr=[[r["ttft_s"] - r["ttft_min_s"] for r in rows],
                           [r["ttft_max_s"] - r["ttft_s"] for r in rows]])
        pts = [r for r in rows if r.get(qkey) is not None]
        ax2.plot([r["ttft_s"] for r in pts], [r[qkey] for r in pts], "o", label=s)
        for r in pts:
            ax2.annotate(str(r["prompt_tokens"]), (r["ttft_s"], r[qkey]),
                         fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.set(xlabel="prompt tokens", ylabel="TTFT (s), median, min-max", title="TTFT")
    if use_nll:
        ax2.set(xlabel="TTFT (s)", ylabel="continuation NLL / exact prefill (lower is better)",
                title="quality vs TTFT (labels: prompt tokens)")
        ax2.set_yscale("log")
    else:
        ax2.set(xlabel="TTFT (s)", ylabel="first-token agreement with full prefill",
                title="quality vs TTFT (labels: prompt tokens)", ylim=(-0.05, 1.05))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def _task_pareto(ax, records):
    full = {r["prompt_tokens"]: r["ttft_s"] for r in records if r["strategy"] == "full"}
    pts = [(r["ttft_s"] / full[r["prompt_tokens"]], r["task_relative_accuracy"], r)
           for r in records if r.get("task_relative_accuracy") is not None
           and r["prompt_tokens"] in full]
    for s in dict.fromkeys(r["strategy"] for _, _, r in pts):
        mine = [(x, y, r) for x, y, r in pts if r["strategy"] == s]
        ax.plot([x for x, _, _ in mine], [y for _, y, _ in mine], "o", label=s)
        for x, y, r in mine:
            ax.annotate(str(r["prompt_tokens"]), (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front, best = [], -1.0
    for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1])):
        if y > best:  # no faster point is as accurate
            front.append((x, y))
            best = y
    if front:
        ax.step([x for x, _ in front], [y for _, y in front], "k--", where="post", alpha=0.5,
                label="Pareto front")
    ax.set(xlabel="TTFT / full's", ylabel=f"{records[0].get('task')} accuracy / full's",
           title="task accuracy vs TTFT (labels: prompt tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def pareto_plot(records, path, title):
    """Two panels over TTFT FLOPs (fraction of full): first-token agreement and NLL ratio."""
    plt, fig, (ax1, ax2) = _figure(2)
    groups = {}
    for r in records:
        key = r["strategy"] if r["strategy"] != "kvp" else f"kvp ({r['predictor_input']})"
        groups.setdefault(key, []).append(r)
    for key, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["flops_ratio"])
        x = [r["flops_ratio"] for r in rows]
        for ax, field in ((ax1, "first_token_agreement"), (ax2, "nll_ratio")):
            ax.plot(x, [r[field] for r in rows], "o-" if len(rows) > 1 else "o", label=key)
            for r in rows:
                ax.annotate(r["aux"], (r["flops_ratio"], r[field]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax1.set(xlabel="TTFT FLOPs / full prefill", ylabel="first-token agreement",
            ylim=(-0.05, 1.05), title="agreement with the base (higher is better)")
    ax2.set(xlabel="TTFT FLOPs / full prefill", ylabel="continuation NLL / exact",
            title="continuation NLL ratio (lower is better)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(plt, fig, path)


def projection_plot(record, path):
    """One panel per link speed: projected TTFT vs machines (runahead, tsp, full on one), for
    each prompt length; measured runs (validation) as crosses where given."""
    rows = record["projection"]
    speeds = sorted({r["gbit_s"] for r in rows})
    plt, fig, axes = _figure(len(speeds))
    colors = {}
    for ax, gb in zip(axes, speeds):
        for n in sorted({r["n"] for r in rows}):
            pts = sorted((r for r in rows if r["gbit_s"] == gb and r["n"] == n),
                         key=lambda r: r["workers"])
            ps = [1] + [r["workers"] for r in pts]
            line, = ax.plot(ps, [pts[0]["full_s"]] + [r["runahead_s"] for r in pts], "o-",
                            color=colors.get(n), label=f"{n} tok runahead")
            colors[n] = line.get_color()
            ax.plot(ps[1:], [r["tsp_s"] for r in pts], "s--", color=colors[n],
                    label=f"{n} tok tsp", alpha=0.7)
        ax.set(xlabel="machines", ylabel="TTFT (s)", yscale="log",
               title=f"{gb:g} Gb/s links, {record['latency_us']:g} us")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Projected KV-Runahead TTFT, {record['model']} (layer times measured on "
                 f"{record['machine'].get('mlx_device', '?')}, {record['date'][:10]})",
                 fontsize=10)
    _save(plt, fig, path)
