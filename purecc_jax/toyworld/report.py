"""report.json (everything), report.md (the table and what it shows), report.png (plots).

`python -m purecc_jax.toyworld.report W` writes report.md and report.png again from W/report.json.
"""

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


def _rate(results: dict[str, Any], name: str, key: str) -> tuple[float, float] | None:
    v = (results.get(name) or {}).get("scores", {}).get(key)
    if v is None:
        return None
    return (v["rate"], v.get("se") or 0.0) if isinstance(v, dict) else (float(v), 0.0)


def _versus(results: dict[str, Any], floor: dict[str, float], a: str, b: str, key: str) -> str | None:
    """'0.30 vs 0.14 (+0.16, beyond / within the noise)' for method a against method b."""
    ra, rb = _rate(results, a, key), _rate(results, b, key)
    if ra is None or rb is None:
        return None
    margin = max(floor.get(key, 0.0), 2 * float(np.hypot(ra[1], rb[1])))
    verdict = "beyond" if abs(ra[0] - rb[0]) > margin else "within"
    return f"{ra[0]:.2f} vs {rb[0]:.2f} ({ra[0] - rb[0]:+.2f}, {verdict} the noise of {margin:.2f})"


def findings(results: dict[str, Any], floor: dict[str, float]) -> list[str]:
    """What the numbers say, computed from them (no sentence is written for a run that is missing)."""
    out = []
    curves = (results.get("purecc") or {}).get("curves") or []
    lam, lp, lc = _final(curves, "lambda_mean"), _final(curves, "l_pure"), _final(curves, "l_cc")
    if lam is not None and lp is not None and lc:
        out.append(
            f"- **Why adaptive PureCC behaves like L_CC here.** At the end of stage B, λ* averages {lam:.3f} and "
            f"L_PureCC is {lp / lc:.1%} of L_CC. With the least-squares λ*, L_PureCC = ‖R_learn − λ*·R_tar‖² is the "
            "part of the learned concept direction R_learn = v(complete) − v(base) orthogonal to the extractor's "
            "R_tar = v_θ1('sks square') − v_θ1(''). R_tar is the whole conditional direction of the target text "
            "(class, colours, background), R_learn only what the identifier adds, so the projection coefficient "
            "is small and the term mostly shrinks R_learn's off-axis part: "
            + ("a regulariser too weak next to L_CC to change what is learned." if lp / lc < 0.1 else
               "a regulariser of noticeable size."))
    for name, lam_text in (("purecc_fixed1", "1"), ("purecc_fixed3", "3")):
        other = _versus(results, floor, name, "lcc", "fidelity_other")
        leak = _versus(results, floor, name, "lcc", "class_prior_striped")
        if other and leak:
            out.append(f"- **Fixed λ = {lam_text}** (L_PureCC pulls v_c towards v_b + {lam_text}·R_tar, so it "
                       f"carries the extractor's guidance): concept on other backgrounds {other} against L_CC; "
                       f"leak into 'a square' {leak}.")
    sg = _versus(results, floor, "purecc_sg", "purecc", "class_prior_striped")
    sg_fid = _versus(results, floor, "purecc_sg", "purecc", "fidelity_ref")
    if sg and sg_fid:
        leak_rate = {n: _rate(results, n, "class_prior_striped")[0] for n in ("purecc_sg", "purecc")}
        lower = leak_rate["purecc_sg"] < leak_rate["purecc"]
        why = ("Through v_b, L_PureCC also moves the base text's prediction towards the complete text's, i.e. "
               "towards the concept")
        out.append(f"- **Gradient through v_b** (the default, as the authors' code): with it stopped, the leak "
                   f"of the concept into 'a square' is {sg} against adaptive PureCC, and fidelity on the "
                   f"reference background {sg_fid}."
                   + ("" if not lower else f" {why}." if "beyond" in sg else
                      f" The direction fits one explanation ({why[0].lower() + why[1:]}), but the difference is "
                      "within the noise."))
    etas = [n for n in results if n.startswith("purecc_eta")]
    eta_lines = [f"{n.removeprefix('purecc_eta')}: {_versus(results, floor, n, 'purecc', 'fidelity_other')}"
                 for n in etas if _versus(results, floor, n, "purecc", "fidelity_other")]
    if eta_lines:
        out.append("- **η** (concept on other backgrounds against η = 1): " + "; ".join(eta_lines) + ".")
    lw = _versus(results, floor, "purecc_layerwise", "lcc_layerwise", "fidelity_other")
    lw_leak = _versus(results, floor, "purecc_layerwise", "lcc_layerwise", "class_prior_striped")
    if lw and lw_leak:
        out.append(f"- **Layer-wise embedding** (the paper's): PureCC against L_CC, both layer-wise: concept on "
                   f"other backgrounds {lw}; leak into 'a square' {lw_leak}.")
    methods = [n for n in results if n != "base"]
    gaps = [(_rate(results, n, "fidelity_ref"), _rate(results, n, "fidelity_other")) for n in methods]
    gaps = [(a[0], b[0]) for a, b in gaps if a and b]
    if gaps:
        every = all(b < a - floor.get("fidelity_other", 0.0) for a, b in gaps)
        out.append(f"- **{'The background is absorbed by every method' if every else 'Background'}.** Over all "
                   f"runs the concept appears on the references' gray background in {min(a for a, _ in gaps):.2f}-"
                   f"{max(a for a, _ in gaps):.2f} of samples and on the other backgrounds in "
                   f"{min(b for _, b in gaps):.2f}-{max(b for _, b in gaps):.2f}"
                   + (": none of them separates the concept from its background, which is the gap PureCC "
                      "claims to close." if every else "."))
    base_all = _rate(results, "base", "world_all")
    after = [_rate(results, n, "world_all") for n in methods]
    after = [a[0] for a in after if a]
    if base_all and after:
        damaged = max(after) < base_all[0] - max(floor.get("world_all", 0.0), 2 * base_all[1])
        out.append(f"- **Preservation.** Concept-free world prompts are all-correct for {base_all[0]:.2f} of the "
                   f"base model's samples and {min(after):.2f}-{max(after):.2f} after customization"
                   + (": every method, PureCC included, damages what the base model could do." if damaged
                      else "."))
    return out


TARGETS = {"world_background": 0.9, "world_colour": 0.9, "world_shape": 0.8}


def base_accuracy(scores: dict[str, Any]) -> list[str]:
    """The base model on held-out attribute combinations, against the pretraining targets."""
    rows = ["| attribute (held-out combinations) | accuracy | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        v = scores.get(key)
        if v is not None:
            rows.append(f"| {key.removeprefix('world_')} | {_cell(v)} | ≥ {target:.2f} |")
    for key, v in scores.items():  # shape accuracy per asked shape
        if key.startswith("world_shape_") and v is not None:
            rows.append(f"| shape, when asked for a {key.removeprefix('world_shape_')} | {_cell(v)} | |")
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
        "## Findings",
        "Comparisons are against the noise floor above (or twice the combined standard error, if larger).",
        "",
        *(findings(results, floor) or ["(needs the lcc, lcc_seed1 and purecc runs)"]),
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
        if steps and "fixed" not in name:  # fixed λ runs are flat lines at their λ
            axes[1].plot(steps, [c["lambda_mean"] for c in curves if "lambda_mean" in c], label=name)
            axes[2].plot(steps, [c["l_pure"] for c in curves if "l_pure" in c], label=f"{name} L_PureCC")
    for name in ("purecc", "lcc"):
        curves = (results.get(name) or {}).get("curves") or []
        if curves:
            axes[2].plot([c["step"] for c in curves], [c["l_cc"] for c in curves], "--", label=f"{name} L_CC")
    axes[1].set_title("adaptive λ* (batch mean) during stage B")
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


def rewrite(workdir: str | Path) -> None:
    """report.md and report.png again from workdir/report.json (after a change to this module)."""
    workdir = Path(workdir)
    path = workdir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the toy world into {workdir} first")
    write(workdir, json.loads(path.read_text()))


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m purecc_jax.toyworld.report WORKDIR")
    rewrite(sys.argv[1])
