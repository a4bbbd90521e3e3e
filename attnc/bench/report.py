"""Benchmark results as JSON, a markdown table (ratios to the peers) and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from attnc.bench import computed

PEER_LABELS = {"attnc": "attnc", "attnc_default": "attnc default", "cudnn": "cuDNN SDPA", "fa2": "SDPA flash (FA2)",
               "flex": "FlexAttention"}
CONVENTION = ("TFLOP/s count only unmasked score elements: (2·qk_dim + 2·v_dim) FLOPs per element in the forward, "
              "2.5× that in the backward (3.5× for forward + backward), so masked variants compare with dense ones.")


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    if row.get("error"):
        return "n/a"
    return f"{row['tflops']:.0f}"


def markdown(results: list[dict], title: str) -> str:
    """One row per case: TFLOP/s per peer, attnc's ratio to each, setup times, peak memory, max difference; after a
    tuned run (``attnc bench --tune``) also the tuned config's gain over the default, the tuning's seconds and
    compile + first call in a fresh process."""
    peers = [p for p in PEER_LABELS if any(r["peer"] == p for r in results)]
    others = [p for p in peers if p not in ("attnc", "attnc_default")]
    tuned = any("tune_s" in r for r in results)
    cases = list(dict.fromkeys(r["case"] for r in results))
    head = ["case"] + [PEER_LABELS[p] for p in peers] + [f"attnc / {PEER_LABELS[p]}" for p in others]
    if tuned:
        head += ["tuned / default", "configs default → tuned", "tune s", "first call s"]
    head += ["attnc build s", "Flex block mask ms", "attnc peak MiB", "max abs diff to a peer"]
    lines = [f"### {title}", "", CONVENTION, "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for case in cases:
        rows = {r["peer"]: r for r in results if r["case"] == case}
        cells = [case] + [_cell(rows.get(p)) for p in peers]
        ours = rows.get("attnc")
        ours = ours if ours and not ours.get("error") else None
        cells += [_ratio(ours, rows.get(p)) for p in others]
        if tuned:
            default = rows.get("attnc_default")
            cells.append(_ratio(ours, default))
            configs = ours and "tuned_config" in ours
            cells.append(f"{ours['default_config']} → {ours['tuned_config']}" if configs else "—")
            cells.append(f"{ours['tune_s']:.0f}" if ours and "tune_s" in ours else "—")
            cells.append(f"{ours['first_call_s']:.2f}" if ours and "first_call_s" in ours else "—")
        cells.append(f"{ours['setup_ms'] / 1e3:.1f}" if ours else "—")
        flex = rows.get("flex")
        cells.append(f"{flex['setup_ms']:.1f}" if flex and not flex.get("error") and flex["setup_ms"] else "—")
        cells.append(f"{ours['peak_mib']:.0f}" if ours else "—")
        cells.append(f"{ours['max_diff']:.1e}" if ours and ours.get("max_diff") is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    imports = next((r["one_time_imports_s"] for r in results if r.get("one_time_imports_s")), None)
    if imports:
        once = ", ".join(f"`{module}` {seconds:.2f} s" for module, seconds in imports.items())
        lines += ["", f"First call (a fresh process, kernel on disk, tuning entry present): plus, once per process, "
                      f"the imports any first op pays: {once}."]
    errors = [r for r in results if r.get("error")]
    if errors:
        lines += ["", "Not measured: " + "; ".join(f"{r['peer']} on {r['case']}: {r['error']}" for r in errors)]
    return "\n".join(lines) + "\n"


def _ratio(ours: dict | None, other: dict | None) -> str:
    if ours is None or other is None or other.get("error"):
        return "—"
    return f"{ours['tflops'] / other['tflops']:.2f}×"


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [p for p in PEER_LABELS if any(r["peer"] == p for r in results)]
    cases = list(dict.fromkeys(r["case"] for r in results))
    width = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(cases)), 4.5))
    for n, peer in enumerate(peers):
        values = []
        for case in cases:
            row = next((r for r in results if r["case"] == case and r["peer"] == peer), None)
            values.append(row["tflops"] if row and not row.get("error") else 0)
        ax.bar([i + n * width for i in range(len(cases))], values, width, label=PEER_LABELS[peer])
    ax.set_xticks([i + width * (len(peers) - 1) / 2 for i in range(len(cases))], cases, rotation=35, ha="right",
                  fontsize=7)
    ax.set_ylabel("TFLOP/s (unmasked elements)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_steps(results: list[dict]) -> list[dict]:
    """The rows of a backward run as rows of their forward + backward timing (``step_*``: TFLOP/s over the forward's
    and the backward's FLOPs, milliseconds, peak memory), for the same table; none for a forward run."""
    if not any("step_tflops" in r for r in results):
        return []
    steps = []
    for r in results:
        step = {k: v for k, v in r.items() if k not in ("tflops", "ms", "min_ms", "peak_mib")}
        if "step_tflops" in r:
            step.update(tflops=r["step_tflops"], ms=r["step_ms"], peak_mib=r["step_peak_mib"])
        elif not r.get("error"):
            step["error"] = r.get("step_error", "not timed")
        steps.append(step)
    return steps


def write(results: list[dict], out_dir: Path, stem: str, title: str) -> str:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` under ``out_dir``; the markdown text (a forward run:
    then attnc over computed elements, `attnc.bench.computed`; a backward run: the backward alone, then forward +
    backward)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counted = computed.computed_rows(results)
    for row in counted:  # attnc's forward rows gain the computed-element figures
        next(r for r in results if r["peer"] == "attnc" and r["case"] == row["case"]).update(
            {k: row[k] for k in ("computed", "computed_tflops", "dense_share")})
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, title)
    if counted:
        text += ("\n### attnc over computed elements\n\nEvery in-bounds element of the tiles the kernel visits, "
                 "masked or not; the last column against this run's dense non-causal figure.\n\n"
                 + computed.markdown(counted))
    steps = training_steps(results)
    if steps:
        text += "\n" + markdown(steps, title.replace("Backward", "Forward + backward", 1))
    (out_dir / f"{stem}.md").write_text(text)
    plot(results, out_dir / f"{stem}.png", title)
    return text
