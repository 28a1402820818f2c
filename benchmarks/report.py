"""Regenerate the results table (markdown) and plot (PNG) from one or more results JSON files.

    python benchmarks/report.py benchmarks/results/cpu-2026-11-25.json
    python benchmarks/report.py results/h100-*.json --readme benchmarks/README.md   # also refresh README's table

Writes ``<stem>.md`` and ``<stem>.png`` beside the (first) JSON unless --md / --png say otherwise. The numbers
are copied from the rows as they are; nothing is recomputed except the "largest resolution that ran" summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

from seg4diff_fast.bench import format_bytes, validate_results

README_BEGIN = "<!-- results:begin (benchmarks/report.py writes this block) -->"
README_END = "<!-- results:end -->"


def load(paths):
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        validate_results(doc)
        docs.append(doc)
    return docs


def _cell(row):
    if row["status"] != "ok":
        return {"oom": "OOM", "unsupported": "n/s", "error": "error"}[row["status"]]
    text = f"{row['median_ms']:.3g} ms"
    if row["peak_mem_bytes"] is not None:
        text += f", {format_bytes(row['peak_mem_bytes'])}"
    return text


def _header(doc):
    kind = "CPU" if doc["device_type"] == "cpu" else doc["device_type"].upper()
    threads = f", {doc['torch_threads']} torch thread(s)" if "torch_threads" in doc else ""
    return (f"{kind}: {doc['device']}{threads}; torch {doc['torch']}, triton {doc['triton']}, "
            f"commit {doc['commit']}, {doc['datetime'] if 'datetime' in doc else doc['date']}")


def kernel_table(rows):
    """One line per (case, dtype, batch); one column per implementation: median time, peak memory or status."""
    rows = [r for r in rows if r["suite"] == "kernel"]
    if not rows:
        return ""
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["case"], r["dtype"], r["batch"], r["heads"], r["head_dim"]), {})[r["impl"]] = r
    out = ["| case | dtype | B | H x D | " + " | ".join(impls) + " |", "|---" * (4 + len(impls)) + "|"]
    for (case, dtype, batch, heads, d), by_impl in groups.items():
        cells = [_cell(by_impl[i]) if i in by_impl else "" for i in impls]
        out.append(f"| {case} | {dtype} | {batch} | {heads} x {d} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def error_table(rows):
    """Max abs error vs the float64 reference and TFLOP/s of every implementation that ran, per dtype."""
    rows = [r for r in rows if r["suite"] == "kernel" and r["status"] == "ok"]
    if not rows:
        return ""
    out = ["| impl | dtype | max abs error (worst case) | TFLOP/s (best case) |", "|---|---|---|---|"]
    keys = OrderedDict.fromkeys((r["impl"], r["dtype"]) for r in rows)
    for impl, dtype in keys:
        sel = [r for r in rows if r["impl"] == impl and r["dtype"] == dtype]
        err = max(r["max_abs_err"] for r in sel if r["max_abs_err"] is not None)
        best = max(r["tflops"] for r in sel if r["tflops"] is not None)
        out.append(f"| {impl} | {dtype} | {err:.1e} | {best:.3g} |")
    return "\n".join(out)


def e2e_table(rows):
    rows = [r for r in rows if r["suite"] == "e2e"]
    if not rows:
        return ""
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    groups = OrderedDict()
    for r in rows:
        groups.setdefault((r["model"], r["resolution"], r["dtype"], r["batch"]), {})[r["impl"]] = r
    out = ["| model | resolution | tokens (img + txt) | dtype | " + " | ".join(impls) + " |",
           "|---" * (4 + len(impls)) + "|"]
    for (model, res, dtype, batch), by_impl in groups.items():
        any_row = next(iter(by_impl.values()))
        cells = [_cell(by_impl[i]) if i in by_impl else "" for i in impls]
        out.append(f"| {model} | {res}^2 | {any_row['n_img']} + {any_row['n_txt']} | {dtype} | "
                   + " | ".join(cells) + " |")
    fits = OrderedDict()
    for r in rows:
        key = (r["model"], r["impl"])
        fits.setdefault(key, None)
        if r["status"] == "ok" and (fits[key] is None or r["resolution"] > fits[key]):
            fits[key] = r["resolution"]
    out += ["", "Largest resolution that ran (of those tried):", ""]
    for (model, impl), res in fits.items():
        statuses = sorted({r["status"] for r in rows if (r["model"], r["impl"]) == (model, impl)})
        out.append(f"- {model} / {impl}: " + (f"{res}^2" if res else f"none ({', '.join(statuses)})"))
    return "\n".join(out)


def markdown(docs):
    parts = []
    for doc in docs:
        parts.append(f"Measured on {_header(doc)}.")
        if doc["settings"].get("about"):
            parts.append(f"Conditions, as recorded with the run: {doc['settings']['about']}")
        if doc["device_type"] == "cpu":
            measured = any(r["peak_mem_bytes"] is not None for r in doc["rows"])
            memory = ("peak memory from the CPU allocator's traffic (torch.profiler)" if measured
                      else "peak memory not measured (n/a)")
            parts.append(f"CPU run at small shapes: timings of the torch paths only, {memory}, the Triton kernel "
                         "and the CUDA-only SDPA backends not run (n/s).")
        for title, table in (("Kernel: median time, peak memory above the inputs", kernel_table(doc["rows"])),
                             ("Kernel: accuracy and rate", error_table(doc["rows"])),
                             ("End to end: one forward (capture at the expert layer), VAE encode", e2e_table(doc["rows"]))):
            if table:
                parts += [f"**{title}**", table]
    return "\n\n".join(parts) + "\n"


def plot(docs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for doc in docs for r in doc["rows"] if r["suite"] == "kernel" and r["status"] == "ok"]
    models = list(OrderedDict.fromkeys(r["model"] for r in rows)) or ["(no rows)"]
    have_mem = any(r["peak_mem_bytes"] is not None for r in rows)
    nrows = 2 if have_mem else 1
    fig, axes = plt.subplots(nrows, len(models), figsize=(5.5 * len(models), 4.2 * nrows), squeeze=False)
    for j, model in enumerate(models):
        sel = [r for r in rows if r["model"] == model]
        # One line per (impl, dtype) at batch 1 (or the smallest batch present).
        batch = min((r["batch"] for r in sel), default=1)
        series = OrderedDict()
        for r in sel:
            if r["batch"] == batch:
                series.setdefault((r["impl"], r["dtype"], r["n_txt"]), []).append(r)
        if series and all(len(pts) == 1 for pts in series.values()):
            # One shape only (a CPU run): bars, one per implementation and dtype.
            labels = [f"{impl} {dtype}" for impl, dtype, _ in series]
            n = next(iter(series.values()))[0]
            for i in range(nrows):
                ax = axes[i][j]
                vals = [pts[0]["median_ms"] if i == 0 else (pts[0]["peak_mem_bytes"] or 0) / 2**30
                        for pts in series.values()]
                ax.barh(range(len(vals)), vals, color=[f"C{k}" for k in range(len(vals))])
                ax.set_yticks(range(len(vals)), labels, fontsize=7)
                ax.set_xlabel("median time (ms)" if i == 0 else "peak memory above inputs (GiB)")
                ax.grid(True, axis="x", alpha=0.3)
            axes[0][j].set_title(f"{model}: N = {n['n_img'] + n['n_txt']}, "
                                 f"{n['heads']} heads x {n['head_dim']}, batch {batch}")
            continue
        for (impl, dtype, n_txt), pts in series.items():
            pts.sort(key=lambda r: r["n_img"])
            x = [r["n_img"] + r["n_txt"] for r in pts]
            label = f"{impl} {dtype}" + (f" txt{n_txt}" if len({k[2] for k in series}) > 1 else "")
            axes[0][j].plot(x, [r["median_ms"] for r in pts], marker="o", label=label)
            if have_mem:
                axes[1][j].plot(x, [(r["peak_mem_bytes"] or 0) / 2**30 for r in pts], marker="o", label=label)
        axes[0][j].set_title(f"{model}, batch {batch}")
        axes[0][j].set_ylabel("median time (ms)")
        if have_mem:
            axes[1][j].set_ylabel("peak memory above inputs (GiB)")
        for i in range(nrows):
            ax = axes[i][j]
            ax.set_xlabel("joint sequence length N")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=7)
    fig.suptitle(_header(docs[0]) if docs else "", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: Path, text: str, png: Path) -> None:
    body = readme.read_text(encoding="utf-8")
    if README_BEGIN not in body or README_END not in body:
        raise SystemExit(f"{readme}: no results block ({README_BEGIN} ... {README_END})")
    rel = Path(png).resolve().relative_to(readme.resolve().parent) if Path(png).resolve().is_relative_to(
        readme.resolve().parent) else Path(png)
    block = f"{README_BEGIN}\n\n{text}\n![benchmark plot]({rel.as_posix()})\n\n{README_END}"
    head, rest = body.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + block + tail, encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON file(s) written by run.py or `bench --json`")
    p.add_argument("--md", default=None, help="markdown output (default: <first>.md)")
    p.add_argument("--png", default=None, help="plot output (default: <first>.png)")
    p.add_argument("--readme", default=None, help="also replace the results block of this README")
    args = p.parse_args(argv)
    docs = load(args.results)
    first = Path(args.results[0])
    md = Path(args.md) if args.md else first.with_suffix(".md")
    png = Path(args.png) if args.png else first.with_suffix(".png")
    text = markdown(docs)
    md.write_text(text, encoding="utf-8")
    plot(docs, png)
    if args.readme:
        update_readme(Path(args.readme), text, png)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
