"""The FS and KD students' full-ECSSD MAE against their whole training budget, over the chain of reference passes.

Each reference pass after the fourth continues the previous pass's two students for one more cosine cycle (the
same steps for both, give or take an epoch), sometimes with the decoder widened. This script reads each pass's
table in ``benchmarks/RESULTS.md`` (the row of the pass's FS and KD run: its steps and full-ECSSD MAE), adds the
steps up along the chain, and draws the two curves and their ratio -- the picture of where KD's margin comes from
and where it is heading. Nothing is measured here: the figures are the ones the passes' ``eval`` wrote.

    .venv/bin/python benchmarks/budget_curve.py            # figure + RESULTS.md section + an MLflow run

Writes ``benchmarks/figures/budget-curve.png``, the RESULTS.md section ``budget-curve`` and an MLflow run
``budget-curve`` (the figure, and each point as metrics at its cumulative step) in the reference runs' store
(``runs/ref/mlflow.db``, experiment ``sodkd-reference``; ``--no-mlflow`` skips it).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
FIGURE = REPO / "benchmarks" / "figures" / "budget-curve.png"
STORE = REPO / "runs" / "ref" / "mlflow.db"

# the chain: (RESULTS.md section, FS run, KD run, decoder width); each pass starts from the one before it
CHAIN = [
    ("reference-runs-4", "fs", "kd-sharp", 16),
    ("reference-runs-5", "fs-c2", "kd-sharp-c2", 16),
    ("reference-runs-6", "fs-c3", "kd-sharp-c3", 16),
    ("reference-runs-7", "fs-c4", "kd-sharp-c4", 16),
    ("reference-runs-8", "fs-c5", "kd-sharp-c5", 16),
    ("reference-runs-9", "fs-c6", "kd-sharp-c6", 16),
    ("reference-runs-10", "fs-w32", "kd-sharp-w32", 32),
    ("reference-runs-11", "fs-w48", "kd-sharp-w48", 48),
    ("reference-runs-18", "fs-w48-c2", "kd-sharp-w48-c2-e4", 48),
    ("reference-runs-19", "fs-w48-c3", "kd-sharp-w48-c3", 48),
    ("reference-runs-20", "fs-w48-c4", "kd-sharp-w48-c4", 48),
    ("reference-runs-21", "fs-w48-c5", "kd-sharp-w48-c5", 48),   # from the four-cycle means: the same budget behind
    ("reference-runs-22", "fs-w48-c6", "kd-sharp-w48-c6", 48),   # from the five-file means
]
# the second chain (twenty-third pass on): the budget in the encoder, MobileNetV3 x1.0 with c = 24, from random weights
CHAIN_X1 = [(f"reference-runs-{23 + i}", f"fs-x1c24{s}", f"kd-sharp-x1c24{s}", 24)
            for i, s in enumerate(["", "-c2", "-c3", "-c4", "-c5", "-c6", "-c7", "-c8"])]
CHAINS = {"MobileNetV3 x0.5": CHAIN, "MobileNetV3 x1.0": CHAIN_X1}   # label -> passes, in order
AIM, PAPER = 0.85, 0.90          # the KD/FS aim; KD-SCFNet's own ratio
TEACHER = ("CSNet-L-x2 + flip TTA", 0.067)


def section_text(text: str, name: str) -> str | None:
    m = re.search(rf"<!-- section: {re.escape(name)} -->(.*?)<!-- end: {re.escape(name)} -->", text, re.S)
    return m.group(1) if m else None


def table_row(section: str, run: str) -> dict[str, float]:
    """Steps and ECSSD MAE of ``run``'s row in a reference-runs table (columns: model | learns from | steps |
    train wall | ECSSD MAE | ... | MAE / FS), the ratio as the table has it (from unrounded MAEs)."""
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == f"`{run}`":
            return {"steps": int(cells[2].replace(",", "")), "mae": float(cells[4]), "over_fs": float(cells[-1])}
    raise KeyError(run)


def read_chain(text: str, chain: list[tuple] = CHAIN) -> list[dict]:
    """One point per pass of ``chain`` present in ``text``, with cumulative steps; stops at the first pass not yet
    written."""
    points, fs_total, kd_total = [], 0, 0
    for section, fs, kd, width in chain:
        body = section_text(text, section)
        if body is None:
            break
        try:
            f, d = table_row(body, fs), table_row(body, kd)
        except KeyError as e:
            raise SystemExit(f"{RESULTS}: section {section} has no row for run {e}") from e
        fs_total += f["steps"]
        kd_total += d["steps"]
        points.append({"section": section, "fs": fs, "kd": kd, "fs_run_steps": f["steps"], "width": width,
                       "fs_steps": fs_total, "kd_steps": kd_total, "fs_mae": f["mae"], "kd_mae": d["mae"],
                       "ratio": d["over_fs"]})
    return points


def draw(chains: dict[str, list[dict]], path: Path) -> None:
    """Both chains' FS and KD MAE (top) and ratio (bottom) against cumulative steps; the first chain solid, with its
    decoder widenings marked, the others dashed."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    for i, (label, points) in enumerate(chains.items()):
        if not points:
            continue
        ls, fill = ("-", None) if i == 0 else ("--", "none")
        fx = [p["fs_steps"] / 1000 for p in points]
        kx = [p["kd_steps"] / 1000 for p in points]
        top.plot(fx, [p["fs_mae"] for p in points], "o" + ls, color="tab:gray", mfc=fill,
                 label=f"FS, {label} (4,966 DUTS-TR masks)")
        top.plot(kx, [p["kd_mae"] for p in points], "s" + ls, color="tab:blue", mfc=fill,
                 label=f"KD, {label} (8,475 images, teacher labels)")
        bottom.plot(kx, [p["ratio"] for p in points], "d" + ls, color="tab:blue", mfc=fill, label=f"KD / FS, {label}")
    top.axhline(TEACHER[1], color="tab:green", ls=":", label=f"teacher: {TEACHER[0]} ({TEACHER[1]:.3f})")
    first = next(iter(chains.values()))     # the chain whose decoder widenings are marked
    bottom.axhline(PAPER, color="tab:orange", ls="--", label=f"KD-SCFNet's ratio ({PAPER:.2f})")
    bottom.axhline(AIM, color="tab:red", ls="--", label=f"the aim ({AIM:.2f})")
    for ax in (top, bottom):
        for a, b in zip(first, first[1:]):
            if b["width"] != a["width"]:
                ax.axvline((b["fs_steps"] - b["fs_run_steps"]) / 1000, color="k", alpha=0.25, lw=1)
        ax.grid(alpha=0.3)
    for a, b in zip(first, first[1:]):
        if b["width"] != a["width"]:
            top.annotate(f"c = {b['width']}", ((b["fs_steps"] - b["fs_run_steps"]) / 1000, top.get_ylim()[1]),
                         xytext=(3, -12), textcoords="offset points", fontsize=8)
    top.set_ylabel("full ECSSD MAE (as trained)")
    top.set_title("scfnet_m3 students, one cosine cycle per point (224 px, batch 16; decoder c marked for x0.5)",
                  fontsize=10)
    bottom.set_ylabel("MAE ratio")
    bottom.set_xlabel("optimizer steps since random weights (thousands)")
    top.legend(fontsize=7, loc="upper right")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(chains: dict[str, list[dict]]) -> str:
    rows = ["| encoder | section | FS run | KD run | decoder c | FS steps (total) | KD steps (total) | FS MAE | KD MAE "
            "| KD / FS |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {label} | {p['section']} | `{p['fs']}` | `{p['kd']}` | {p['width']} | {p['fs_steps']:,} | "
             f"{p['kd_steps']:,} | {p['fs_mae']:.3f} | {p['kd_mae']:.3f} | {p['ratio']:.2f} |"
             for label, points in chains.items() for p in points]
    return "\n".join(rows)


def log_mlflow(chains: dict[str, list[dict]], path: Path) -> str:
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{STORE}")
    mlflow.set_experiment("sodkd-reference")
    with mlflow.start_run(run_name="budget-curve") as run:
        for i, points in enumerate(chains.values()):
            tag = "" if i == 0 else f"_chain{i + 1}"
            for p in points:
                mlflow.log_metrics({f"ecssd/mae_fs{tag}": p["fs_mae"], f"ecssd/mae_kd{tag}": p["kd_mae"],
                                    f"ecssd/kd_over_fs{tag}": p["ratio"]}, step=p["kd_steps"])
        mlflow.log_artifact(str(path), artifact_path="figures")
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-mlflow", action="store_true", help="do not log the figure to the reference runs' store")
    p.add_argument("--no-write", action="store_true", help="print the table only (no figure, no RESULTS.md)")
    args = p.parse_args(argv)
    text = RESULTS.read_text()
    chains = {label: read_chain(text, chain) for label, chain in CHAINS.items()}
    if not any(chains.values()):
        raise SystemExit(f"{RESULTS}: no reference-runs section of either chain found")
    print(table(chains))
    if args.no_write:
        return 0
    draw(chains, FIGURE)
    spec = importlib.util.spec_from_file_location("_bench_models", REPO / "benchmarks" / "models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    last = "; ".join(f"{label}: {pts[-1]['section']}, FS {pts[-1]['fs_steps']:,} steps in all, KD {pts[-1]['kd_steps']:,}"
                     for label, pts in chains.items() if pts)
    bench.write_section(RESULTS, "budget-curve", "\n".join([
        "## Where KD's margin comes from and where it is heading: MAE against the whole training budget",
        "",
        "`.venv/bin/python benchmarks/budget_curve.py` (no measurement of its own: each pass's `eval` figures, read "
        "from its section above, steps summed along the chain of cosine cycles). Full ECSSD MAE as trained; KD / FS "
        "as each pass's table has it (from unrounded MAEs). Each pass starts from the one before it. Two chains: "
        "MobileNetV3 x0.5 (solid; the decoder widened function-preservingly at c = 32 and c = 48) and, from the "
        "twenty-third pass, MobileNetV3 x1.0 with c = 24 (dashed, hollow; 2.94 M params, 0.285 GMACs), the same "
        "recipe and cycle lengths.",
        "",
        f"![FS and KD MAE against optimizer steps since random weights, and their ratio]"
        f"({FIGURE.relative_to(RESULTS.parent).as_posix()})",
        "",
        table(chains),
        "",
        f"Last points: {last}.",
    ]))
    print(f"wrote {FIGURE.relative_to(REPO)} and the section budget-curve of {RESULTS.relative_to(REPO)}")
    if not args.no_mlflow:
        print(f"MLflow run {log_mlflow(chains, FIGURE)} in {STORE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
