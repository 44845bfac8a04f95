"""The benchmark's report: a markdown page laid out like the paper's Tables 4 and 5, with the
paper's figures beside ours and both as fractions of FT, and PNG plots (matplotlib, optional:
`pip install -e '.[bench]'`; without it the plots are skipped with a message)."""

from __future__ import annotations

from pathlib import Path

TABLE4 = ("ft-conventional", "ft", "ft-lskip", "ft-cskip", "skip-tuning")
TABLE5 = ("coop", "coop-cached", "clip-adapter", "clip-adapter-cached", "lora", "ft-conventional", "skip-tuning")
OURS_ONLY = ("fast", "paper-schedule")
PLOTS = ("time_vs_memory.png", "cost_vs_classes.png", "cost_vs_omega.png")


def _f(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _seconds(value) -> str:
    return _f(value, "{:.0f}" if value is not None and value >= 100 else "{:.1f}" if value is not None and value >= 10 else "{:.2f}")


def _row(r: dict, accuracy: bool, cpu: bool) -> str:
    paper = r.get("paper") or {}
    acc = r.get("accuracy") or {}
    cells = [r["label"]]
    if accuracy:
        mark = "†" if r.get("accuracy_from") else ""
        cells += [_f(acc.get("base")) + mark, _f(acc.get("new")) + mark, _f(acc.get("H")) + mark]
    if "error" in r:
        cells += [f"failed: {r['error'][:60]}"] + [""] * (5 + cpu)
    else:
        cells += [_seconds(r["epoch_time_s"])] + ([_seconds(r.get("epoch_cpu_s"))] if cpu else [])
        cells += [_f(r["peak_memory_mib"], "{:.0f}"), _f(r.get("time_vs_ft"), "{:.2f}"), _f(r.get("memory_vs_ft"), "{:.2f}"),
                  f"{r['trainable_params'] / 1e6:.3f} M" if r["trainable_params"] < 1e5 else f"{r['trainable_params'] / 1e6:.1f} M"]
    cells += [_f(paper.get("time_s"), "{:.0f}"), _f(paper.get("memory_mb"), "{:.0f}"),
              _f(r.get("paper_time_vs_ft"), "{:.2f}"), _f(r.get("paper_memory_vs_ft"), "{:.2f}")]
    return "| " + " | ".join(cells) + " |"


def _table(title: str, names: tuple[str, ...], by_name: dict, accuracy: bool, cpu: bool) -> list[str]:
    head = ["method"] + (["base", "new", "H"] if accuracy else []) + ["epoch s"] + (["epoch CPU s"] if cpu else []) + [
        "peak MiB", "time ÷ FT", "memory ÷ FT", "trained params", "paper s", "paper MB", "paper time ÷ FT", "paper memory ÷ FT"]
    out = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += [_row(by_name[n], accuracy, cpu) for n in names if n in by_name]
    return out + [""]


def render_markdown(report: dict) -> str:
    meta, config, machine = report["meta"], report["config"], report.get("machine", {})
    work = config["cost"]
    by_name = {r["name"]: r for r in report["methods"]}
    task = report.get("accuracy_task")
    accuracy = task is not None
    memory = next((r["memory_method"] for r in report["methods"] if "memory_method" in r), "–")
    cpu = meta.get("time_basis") == "step_cpu_s"
    lines = [
        f"# skipcache bench — preset `{meta['preset']}`", "",
        meta["description"] + ".", "",
        f"- machine: {machine.get('device_name', '?')}, {machine.get('device', '?')}; Python {machine.get('python', '?')}; "
        f"torch {machine.get('versions', {}).get('torch', '?')}, open_clip {machine.get('versions', {}).get('open_clip_torch', '?')}; "
        f"load average at start {_f(machine.get('load_average_1m_at_start'), '{:.1f}')}; {machine.get('date_utc', '')}",
        f"- cost workload: {work['model']} (random init), {work['classes']} training classes, {work['shots']} shots, batch "
        f"{work['batch_size']} ({work['classes'] * work['shots'] // work['batch_size']} steps per epoch), "
        f"{work['warmup']} warm-up + {work['steps']} timed steps per method, each method in its own process",
        "- epoch s = steps per epoch × median step time of the method's own step object (as `skipcache tune` builds it)"
        + ("; epoch CPU s the same with the process's CPU time per step, which other processes on the machine do not "
           "inflate: **time ÷ FT uses it**" if cpu else "; time ÷ FT uses it"),
        f"- peak MiB: {memory}",
        "- paper: Skip Tuning (CVPR 2025) Tables 4 and 5, ViT-B/16, training time in seconds and memory in MB; "
        "**the paper's memory is a torchinfo estimate, not a measurement**; its time is a whole training run, ours one "
        "epoch of the workload above, so compare the ratios (÷ FT), not the absolute numbers",
    ]
    if accuracy:
        converged = "" if task["converged"] else " (**a smoke run: not trained to convergence; the accuracies mean nothing**)"
        zs = task.get("zeroshot") or {}
        lines.append(f"- accuracy (%): {task['model']} --pretrained {task['pretrained']} on `{task['dataset']}`, base-to-new, "
                     f"{task['shots']} shots, {task['epochs']} epochs, batch {task['batch_size']}, each method's learning rates "
                     f"in the JSON{converged}; zero-shot base {_f(zs.get('base'))}, new {_f(zs.get('new'))}, H {_f(zs.get('H'))}")
    reference = by_name.get(meta.get("reference", ""), {}).get("label", "FT")
    lines.append(f"- time ÷ FT and memory ÷ FT: against **{reference}**, as the paper's are against its FT")
    if any(r.get("accuracy_from") for r in report["methods"]):
        lines.append("- †: the accuracy of the same training with the cache (the row named in `accuracy_from`): "
                     "the uncached form computes the same thing, up to float rounding")
    findings = report.get("findings") or []
    if findings:
        lines += ["", "**What the numbers say** (computed from the tables below):", ""] + [f"- {f}" for f in findings]
    lines += ["", *_table("Table 4 layout: the ablation", TABLE4, by_name, accuracy, cpu),
              *_table("Table 5 layout: other methods", TABLE5, by_name, accuracy, cpu)]
    extra = [n for n in OURS_ONLY if n in by_name]
    if extra:
        lines += _table("Not in the paper's tables", tuple(extra), by_name, accuracy, cpu)
        lines += ["`paper-schedule`: the authors' schedule, trained like the others: blocks 1..ω frozen but run every step "
                  "(no persistent cache), 77-token prompts, their CSkip (paper-code, ranks from the current features). "
                  "`fast`: ω = N − N//4, r = 0.25.", ""]
    for kind, key, unit in (("classes", "classes", "classes"), ("omega", "omega", "ω")):
        rows = report.get("sweeps", {}).get(kind) or []
        if not rows:
            continue
        lines += [f"### Cost vs {unit}", "", f"| method | {unit} | step ms | step CPU ms | peak MiB | classes per step |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | {r[key]} | failed: {r['error'][:60]} | | | |")
            else:
                cpu_ms = _f(1000 * r["step_cpu_s"] if "step_cpu_s" in r else None)
                lines.append(f"| {r['method']} | {r[key]} | {1000 * r['step_time_s']:.1f} | {cpu_ms} | "
                             f"{r['peak_memory_mib']:.0f} | {r['text_classes_per_step']:.0f} |")
        lines.append("")
    plots = report.get("plots") or {}
    if plots.get("files"):
        lines += ["Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in plots["files"]), ""]
    elif plots.get("skipped"):
        lines += [f"Plots skipped: {plots['skipped']}", ""]
    lines.append(f"Total {meta['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out: Path) -> dict:
    """The three PNG plots; {"files": [...]} or {"skipped": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"skipped": "matplotlib is not installed (pip install -e '.[bench]')"}
    files = []
    ok = [r for r in report["methods"] if "error" not in r and "step_time_s" in r]
    if ok:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
        basis = "epoch_cpu_s" if report["meta"].get("time_basis") == "step_cpu_s" else "epoch_time_s"
        for r in ok:  # the row names (short; the report's tables give the labels)
            left.scatter(r["peak_memory_mib"], r[basis])
            left.annotate(r["name"], (r["peak_memory_mib"], r[basis]), fontsize=8, xytext=(4, 2), textcoords="offset points")
            if r.get("memory_vs_ft") is not None:
                right.scatter(r["memory_vs_ft"], r["time_vs_ft"], color="tab:blue")
                right.annotate(r["name"], (r["memory_vs_ft"], r["time_vs_ft"]), fontsize=8, color="tab:blue",
                               xytext=(4, 2), textcoords="offset points")
            if r.get("paper_memory_vs_ft") is not None:
                right.scatter(r["paper_memory_vs_ft"], r["paper_time_vs_ft"], color="tab:orange", marker="s")
                right.annotate(r["name"], (r["paper_memory_vs_ft"], r["paper_time_vs_ft"]), fontsize=8, color="tab:orange",
                               xytext=(4, -9), textcoords="offset points")
        left.set_xscale("log")
        left.set_yscale("log")
        left.set(xlabel="peak memory (MiB, measured; log)", ylabel=f"epoch {'CPU ' if basis == 'epoch_cpu_s' else ''}time (s; log)", title=f"{report['config']['cost']['model']}: time vs memory")
        right.set(xlabel="memory ÷ FT", ylabel="time ÷ FT", title="relative to FT: ours (blue) vs paper (orange, torchinfo memory)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(_save(fig, out / PLOTS[0], plt))
    for kind, key, xlabel, logx, name in (("classes", "classes", "classes M", True, PLOTS[1]), ("omega", "omega", "ω (frozen blocks)", False, PLOTS[2])):
        rows = [r for r in report.get("sweeps", {}).get(kind, []) if "error" not in r]
        if not rows:
            continue
        fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r[key], r.get("step_cpu_s", r["step_time_s"]) * 1000, r["peak_memory_mib"]) for r in rows if r["method"] == method)
            xs = [p[0] for p in pts]
            t_ax.plot(xs, [p[1] for p in pts], marker="o", label=method)
            m_ax.plot(xs, [p[2] for p in pts], marker="o", label=method)
        t_ax.set(xlabel=xlabel, ylabel="step time (ms; CPU time on the CPU)", title=f"step time vs {xlabel}")
        m_ax.set(xlabel=xlabel, ylabel="peak memory (MiB)", title=f"peak memory vs {xlabel}")
        for ax in (t_ax, m_ax):
            if logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        files.append(_save(fig, out / name, plt))
    return {"files": files}


def _save(fig, path: Path, plt) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
