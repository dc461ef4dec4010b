"""report.json (everything), report.md (the table and what it shows), report.png (plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = (
    ("fidelity_ref", "concept, gray bg (ref)"),
    ("stripes_ref", "stripes, gray bg (ref)"),
    ("fidelity_other", "concept, other bg"),
    ("stripes_other", "stripes, other bg"),
    ("fidelity_and_background_other", "concept + asked bg"),
    ("plain_gray", "'sks square' drawn on gray"),
    ("class_prior_striped", "'a square' striped (leak)"),
    ("world_all", "world prompts all-correct"),
    ("drift_world", "drift vs base (world)"),
    ("drift_class_prior", "drift vs base ('a square')"),
)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        se = value.get("se")
        return f"{value['rate']:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    return f"{value:.4f}"


def _final(curves: list[dict], key: str, last: int = 5) -> float | None:
    vals = [r[key] for r in curves if key in r][-last:]
    return float(np.mean(vals)) if vals else None


def noise_floor(results: dict[str, Any], a: str = "lcc", b: str = "lcc_seed1") -> dict[str, float]:
    """|difference| between two runs of the same method with different seeds, per metric."""
    out = {}
    if a not in results or b not in results:
        return out
    for key, _ in COLUMNS:
        va, vb = results[a]["scores"].get(key), results[b]["scores"].get(key)
        if va is None or vb is None:
            continue
        ra = va["rate"] if isinstance(va, dict) else va
        rb = vb["rate"] if isinstance(vb, dict) else vb
        out[key] = abs(ra - rb)
    return out


def comparison(results: dict[str, Any], floor: dict[str, float]) -> list[str]:
    """Plain sentences: where does PureCC differ from L_CC only by more than the noise floor?"""
    if "purecc" not in results or "lcc" not in results:
        return []
    lines = []
    for key, label in COLUMNS:
        p, l = results["purecc"]["scores"].get(key), results["lcc"]["scores"].get(key)
        if p is None or l is None or key not in floor:
            continue
        rp = p["rate"] if isinstance(p, dict) else p
        rl = l["rate"] if isinstance(l, dict) else l
        se = np.hypot(p.get("se", 0.0), l.get("se", 0.0)) if isinstance(p, dict) else 0.0
        margin = max(floor[key], 2 * se)
        verdict = "beyond" if abs(rp - rl) > margin else "within"
        lines.append(f"- {label}: PureCC {rp:.3f} vs L_CC {rl:.3f} (difference {rp - rl:+.3f}; noise floor "
                     f"{floor[key]:.3f}, 2·SE {2 * se:.3f}): {verdict} the noise.")
    return lines


TARGETS = {"world_background": 0.9, "world_colour": 0.9, "world_shape": 0.8}


def base_accuracy(scores: dict[str, Any]) -> list[str]:
    """The base model on held-out attribute combinations, against the pretraining targets."""
    rows = ["| attribute (held-out combinations) | accuracy | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        v = scores.get(key)
        if v is not None:
            rows.append(f"| {key.removeprefix('world_')} | {_cell(v)} | ≥ {target:.2f} |")
    return rows if len(rows) > 2 else []


def markdown(summary: dict[str, Any]) -> str:
    results = summary["results"]
    floor = noise_floor(results)
    head = "| method | " + " | ".join(label for _, label in COLUMNS) + " | λ* (end) | L_PureCC / L_CC (end) |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    rows = [head, rule]
    for name, r in results.items():
        curves = r.get("curves") or []
        lam = _final(curves, "lambda_mean")
        lp, lc = _final(curves, "l_pure"), _final(curves, "l_cc")
        ratio = None if lp is None or not lc else lp / lc
        cells = [_cell(r["scores"].get(k)) for k, _ in COLUMNS]
        rows.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_cell(lam)} | {_cell(ratio)} |")
    base = summary.get("base_training") or []
    t = summary.get("timings", {})
    lines = [
        "# Toy world: PureCC vs L_CC only",
        "",
        f"Samples per prompt set: {summary['config']['toy']['evaluation']['samples']}; every method uses the same "
        "prompts and initial noise. Rates are fractions of samples (± binomial standard error); drift is the mean "
        "squared pixel difference (images in [0, 1]) to the base model's image for the same prompt and seed.",
        "",
        *rows,
        "",
        "## Differences beyond the noise floor",
        "The noise floor is the difference between two L_CC-only runs that differ only in their seed.",
        "",
        *(comparison(results, floor) or ["(needs the lcc, lcc_seed1 and purecc runs)"]),
        "",
        "## Base model",
        f"Pretraining: {len(base) and base[-1]['step']} steps, final loss {base[-1]['loss']:.4f}." if base else "",
        "",
        *base_accuracy(results.get("base", {}).get("scores", {})),
        "",
        "## Time (seconds)",
        ", ".join(f"{k} {v:.0f}" for k, v in t.items()),
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, r in results.items():
        s = r["scores"]
        if s.get("fidelity_other") is None or s.get("class_prior_striped") is None:
            continue
        x, y = 1 - s["class_prior_striped"]["rate"], s["fidelity_other"]["rate"]
        ax.errorbar(x, y, xerr=s["class_prior_striped"]["se"], yerr=s["fidelity_other"]["se"], fmt="o", capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("preservation: 1 - P(striped | 'a square on ...')")
    ax.set_ylabel("fidelity: P(concept | 'a sks square on <other bg>')")
    ax.set_title("fidelity vs preservation")
    for name, r in results.items():
        curves = r.get("curves") or []
        steps = [c["step"] for c in curves if "lambda_mean" in c]
        if steps:
            axes[1].plot(steps, [c["lambda_mean"] for c in curves if "lambda_mean" in c], label=name)
            axes[2].plot(steps, [c["l_pure"] for c in curves if "l_pure" in c], label=f"{name} L_PureCC")
    for name in ("purecc", "lcc"):
        curves = (results.get(name) or {}).get("curves") or []
        if curves:
            axes[2].plot([c["step"] for c in curves], [c["l_cc"] for c in curves], "--", label=f"{name} L_CC")
    axes[1].set_title("λ* (batch mean) during stage B")
    axes[1].set_xlabel("step")
    axes[2].set_title("loss terms")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    for a in axes[1:]:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir: Path, summary: dict[str, Any]) -> None:
    (workdir / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    (workdir / "report.md").write_text(markdown(summary))
    plot(summary, workdir / "report.png")
