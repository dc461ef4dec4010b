"""report.json (everything), report.md (the table, the tests and what they show), report.png.

Every method ran with several training seeds. A rate is the mean over seeds ± the sample
standard deviation across seeds; two methods differ only where a two-sided Welch's t-test on
their per-seed rates gives p < alpha (`toyworld/stats.py`); the base model is one model, so a
method is tested against it with a one-sample t-test. The findings are written from these
numbers and tests, so they change when the numbers do.

    python -m purecc_jax.toyworld.report W           report.md and report.png again from W/report.json
    python -m purecc_jax.toyworld.report A B         which significance decisions differ between two runs
    python -m purecc_jax.toyworld.report --digest W  sha256 of what W computed (not its timings)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from purecc_jax.toyworld import machine, stats

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
LABELS = dict(COLUMNS)
# The pretraining targets of the shipped base, on held-out attribute combinations.
TARGETS = {"world_background": 0.95, "world_colour": 0.95, "world_shape_circle": 0.9, "world_shape_square": 0.9,
           "world_shape_cross": 0.9}


def _value(v) -> float | None:
    if v is None:
        return None
    return float(v["rate"]) if isinstance(v, dict) else float(v)


def per_seed(results: dict[str, Any], name: str, key: str) -> list[float]:
    """The metric of every run (seed) of a method, in seed order; [] when missing."""
    runs = (results.get(name) or {}).get("runs") or {}
    vals = [_value(r["scores"].get(key)) for r in runs.values()]
    return [v for v in vals if v is not None]


def final_curve(results: dict[str, Any], name: str, key: str, last: int = 5) -> float | None:
    """A training curve's value at the end (mean of its last `last` logged points), averaged over seeds."""
    ends = []
    for r in ((results.get(name) or {}).get("runs") or {}).values():
        vals = [row[key] for row in r.get("curves") or [] if key in row][-last:]
        if vals:
            ends.append(float(np.mean(vals)))
    return float(np.mean(ends)) if ends else None


def _cell(vals: list[float], digits: int = 2) -> str:
    if not vals:
        return "–"
    m, sd = stats.mean_sd(vals)
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(vals) > 1 else "")


def test(results: dict[str, Any], a: str, b: str, key: str) -> stats.Test | None:
    """Method a against method b on one metric: Welch's t across seeds (one-sample against the base)."""
    va, vb = per_seed(results, a, key), per_seed(results, b, key)
    return stats.compare(va, vb) if va and vb else None


def versus(results: dict[str, Any], a: str, b: str, key: str, alpha: float) -> str | None:
    """'0.30 vs 0.14 (+0.16, p = 0.012: significant at 0.05)' for method a against method b."""
    r = test(results, a, b, key)
    if r is None:
        return None
    ma, mb = np.mean(per_seed(results, a, key)), np.mean(per_seed(results, b, key))
    digits = 4 if key.startswith("drift") else 2
    verdict = f"significant at {alpha:g}" if r.significant(alpha) else "not significant"
    return f"{ma:.{digits}f} vs {mb:.{digits}f} ({r.diff:+.{digits}f}, p = {r.p:.3f}: {verdict})"


def _significant(results, a, b, key, alpha) -> bool:
    r = test(results, a, b, key)
    return r is not None and r.significant(alpha)


def decisions(results: dict[str, Any], alpha: float) -> dict[str, dict[str, float | bool]]:
    """Every tested pair: '<a> vs <b>: <metric>' -> difference, p-value and the decision."""
    pairs = [("purecc", "lcc"), ("purecc_sg", "purecc"), ("purecc_layerwise", "lcc_layerwise")]
    pairs += [(n, "lcc") for n in results if n.startswith("purecc_fixed") or n.startswith("purecc_eta")]
    pairs += [(f"{n}_sg", n) for n in results if n.startswith("purecc_eta") and not n.endswith("_sg")]
    pairs += [(n, "base") for n in results if n != "base"]
    out = {}
    for a, b in pairs:
        for key, _ in COLUMNS:
            r = test(results, a, b, key)
            if r is not None and np.isfinite(r.p):
                out[f"{a} vs {b}: {key}"] = {"diff": r.diff, "p": r.p, "significant": r.significant(alpha)}
    return out


def comparison(results: dict[str, Any], alpha: float) -> list[str]:
    """PureCC against L_CC only, every metric: a table of differences and p-values."""
    if not per_seed(results, "purecc", "fidelity_ref") or not per_seed(results, "lcc", "fidelity_ref"):
        return []
    rows = [f"| metric | PureCC | L_CC only | difference | Welch's p | at α = {alpha:g} |",
            "|---|---|---|---|---|---|"]
    for key, label in COLUMNS:
        r = test(results, "purecc", "lcc", key)
        if r is None:
            continue
        digits = 4 if key.startswith("drift") else 2
        rows.append(f"| {label} | {_cell(per_seed(results, 'purecc', key), digits)} | "
                    f"{_cell(per_seed(results, 'lcc', key), digits)} | {r.diff:+.{digits}f} | {r.p:.3f} | "
                    f"{'**different**' if r.significant(alpha) else 'no difference shown'} |")
    return rows


def findings(results: dict[str, Any], alpha: float) -> list[str]:
    """What the numbers say, from the numbers and the tests (a missing run gets no sentence)."""
    out = []
    v = lambda a, b, key: versus(results, a, b, key, alpha)
    lam, lp, lc = (final_curve(results, "purecc", k) for k in ("lambda_mean", "l_pure", "l_cc"))
    if lam is not None and lp is not None and lc:
        out.append(
            f"- **Why adaptive PureCC behaves like L_CC here.** At the end of stage B, λ* averages {lam:.3f} and "
            f"L_PureCC is {lp / lc:.1%} of L_CC (means over seeds). With the least-squares λ*, L_PureCC = "
            "‖R_learn − λ*·R_tar‖² is the part of the learned concept direction R_learn = v(complete) − v(base) "
            "orthogonal to the extractor's R_tar = v_θ1('sks square') − v_θ1(''). R_tar is the whole conditional "
            "direction of the target text (class, colours, background), R_learn only what the identifier adds, "
            "so the projection coefficient is small and the term mostly shrinks R_learn's off-axis part: "
            + ("a regulariser too weak next to L_CC to change what is learned." if lp / lc < 0.1 else
               "a regulariser of noticeable size."))
    main = [(key, v("purecc", "lcc", key)) for key in ("fidelity_ref", "fidelity_other", "class_prior_striped",
                                                       "world_all")]
    main = [(k, s) for k, s in main if s]
    if main:
        sig = [LABELS[k] for k, _ in main if _significant(results, "purecc", "lcc", k, alpha)]
        out.append("- **Adaptive PureCC against L_CC only**: " + "; ".join(f"{LABELS[k]} {s}" for k, s in main)
                   + (f". Significant differences: {', '.join(sig)}." if sig else
                      ". No difference is significant: on this toy world, adaptive PureCC is not distinguishable "
                      "from DreamBooth-LoRA."))
    fixed = sorted((n for n in results if n.startswith("purecc_fixed")), key=lambda n: float(n[12:]))
    for name in fixed:
        other, leak, world_all = (v(name, "lcc", k) for k in ("fidelity_other", "class_prior_striped", "world_all"))
        if other and leak:
            lam_text = name.removeprefix("purecc_fixed")
            out.append(f"- **Fixed λ = {lam_text}** (L_PureCC pulls v_c towards v_b + {lam_text}·R_tar), against "
                       f"L_CC: concept on other backgrounds {other}; leak into 'a square' {leak}"
                       + (f"; world prompts all-correct {world_all}" if world_all else "") + ".")
    sg, sg_fid = v("purecc_sg", "purecc", "class_prior_striped"), v("purecc_sg", "purecc", "fidelity_ref")
    if sg and sg_fid:
        out.append(f"- **Gradient through v_b** (on by default, as in the authors' code): with it stopped "
                   f"(adaptive λ*), the leak of the concept into 'a square' is {sg} against adaptive PureCC, and "
                   f"fidelity on the reference background {sg_fid}.")
    out += _strong_eta(results, alpha)
    lw = v("purecc_layerwise", "lcc_layerwise", "fidelity_other")
    lw_leak = v("purecc_layerwise", "lcc_layerwise", "class_prior_striped")
    if lw and lw_leak:
        out.append(f"- **Layer-wise embedding** (the paper's): PureCC against L_CC, both layer-wise: concept on "
                   f"other backgrounds {lw}; leak into 'a square' {lw_leak}.")
    methods = [n for n in results if n != "base" and per_seed(results, n, "fidelity_ref")]
    if methods:
        absorbed = [n for n in methods if (r := stats.compare(per_seed(results, n, "fidelity_ref"),
                                                              per_seed(results, n, "fidelity_other")))
                    and r.diff > 0 and r.significant(alpha)]
        ref = [np.mean(per_seed(results, n, "fidelity_ref")) for n in methods]
        other = [np.mean(per_seed(results, n, "fidelity_other")) for n in methods]
        every = len(absorbed) == len(methods)
        out.append(f"- **{'The background is absorbed by every method' if every else 'Background'}.** The concept "
                   f"appears on the references' gray background in {min(ref):.2f}-{max(ref):.2f} of samples (means "
                   f"over seeds) and on the other backgrounds in {min(other):.2f}-{max(other):.2f}; the drop is "
                   f"significant for {len(absorbed)} of {len(methods)} methods"
                   + (": none of them separates the concept from its background, which is the gap PureCC claims "
                      "to close." if every else "."))
    base_all = per_seed(results, "base", "world_all")
    if base_all and methods:
        damaged = [n for n in methods if (r := test(results, n, "base", "world_all")) and r.diff < 0
                   and r.significant(alpha)]
        after = [np.mean(per_seed(results, n, "world_all")) for n in methods]
        out.append(f"- **Preservation.** Concept-free world prompts are all-correct for {base_all[0]:.2f} of the "
                   f"base model's samples and {min(after):.2f}-{max(after):.2f} after customization (means over "
                   f"seeds); the drop is significant (one-sample t-test against the base) for {len(damaged)} of "
                   f"{len(methods)} methods" + (": every method, PureCC included, damages what the base model "
                                                 "could do." if len(damaged) == len(methods) else "."))
    return out


def _strong_eta(results: dict[str, Any], alpha: float) -> list[str]:
    """Large η: does L_PureCC hurt concept-free prompts, and is the gradient through v_b the cause?"""
    out = []
    v = lambda a, b, key: versus(results, a, b, key, alpha)
    etas = sorted((n for n in results if n.startswith("purecc_eta") and not n.endswith("_sg")),
                  key=lambda n: float(n.removeprefix("purecc_eta")))
    for name in etas:
        eta = name.removeprefix("purecc_eta")
        lp, lc = final_curve(results, name, "l_pure"), final_curve(results, name, "l_cc")
        ratio = f" (η·L_PureCC / L_CC = {float(eta) * lp / lc:.2f} at the end)" if lp is not None and lc else ""
        world, drift = v(name, "lcc", "world_all"), v(name, "lcc", "drift_world")
        if not world:
            continue
        line = (f"- **η = {eta}**{ratio}, against L_CC only: world prompts all-correct {world}; drift on world "
                f"prompts {drift}; concept on the reference background {v(name, 'lcc', 'fidelity_ref')}.")
        sg_world, sg_drift = v(f"{name}_sg", name, "world_all"), v(f"{name}_sg", name, "drift_world")
        sg_prior = v(f"{name}_sg", name, "drift_class_prior")
        if sg_world and sg_drift:
            def moved(a: str, b: str, key: str, sign: float) -> bool:
                # a significantly above (sign 1) or below (sign -1) b
                r = test(results, a, b, key)
                return r is not None and r.significant(alpha) and sign * r.diff > 0

            hurt = moved(name, "lcc", "world_all", -1)
            helps = moved(f"{name}_sg", name, "world_all", 1)
            less_drift = moved(f"{name}_sg", name, "drift_world", -1)
            line += (f" With the gradient through v_b stopped (same η): world all-correct {sg_world}, drift on "
                     f"world prompts {sg_drift}, drift on 'a square' (the base text) {sg_prior}. ")
            if hurt and (helps or less_drift):
                line += ("So the damage to concept-free prompts comes through v_b: L_PureCC's gradient through the "
                         "base text's prediction moves what the model does for texts without the identifier.")
            elif hurt:
                line += ("The damage to concept-free prompts is significant, but stopping the gradient through "
                         "v_b does not significantly reduce it: the hypothesis that it comes through v_b is not "
                         "supported by this measurement.")
            else:
                line += "A strong L_PureCC does not significantly damage the concept-free prompts here."
        out.append(line)
    return out


def base_accuracy(scores: dict[str, Any]) -> list[str]:
    """The base model on held-out attribute combinations, against the pretraining targets."""
    rows = ["| attribute (held-out combinations) | accuracy | target | met |", "|---|---|---|---|"]
    for key, target in TARGETS.items():
        v = scores.get(key)
        if v is not None:
            name = key.removeprefix("world_").replace("shape_", "shape, asked for a ")
            rows.append(f"| {name} | {v['rate']:.2f} ± {v['se']:.2f} (n = {v['n']}) | ≥ {target:.2f} | "
                        f"{'yes' if v['rate'] >= target else '**no**'} |")
    v = scores.get("world_all")
    if v is not None:
        rows.append(f"| all three correct | {v['rate']:.2f} ± {v['se']:.2f} (n = {v['n']}) | | |")
    if len(rows) == 2:
        return []
    combos = scores.get("world_by_combination") or {}
    if combos:
        rows += ["", "| held-out combination | shape right | all three right | n |", "|---|---|---|---|"]
        for name, v in combos.items():
            rows.append(f"| {name} | {v['shape']['rate']:.2f} | {v['all']['rate']:.2f} | {v['shape']['n']} |")
    return rows


def markdown(summary: dict[str, Any]) -> str:
    results = summary["results"]
    toy = summary["config"]["toy"]
    alpha = toy.get("alpha", stats.ALPHA)
    seeds = toy.get("seeds", ())
    head = "| method | " + " | ".join(label for _, label in COLUMNS) + " | λ* (end) | L_PureCC / L_CC (end) |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, r in results.items():
        lam = final_curve(results, name, "lambda_mean")
        lp, lc = final_curve(results, name, "l_pure"), final_curve(results, name, "l_cc")
        cells = [_cell(per_seed(results, name, k), 4 if k.startswith("drift") else 2) for k, _ in COLUMNS]
        rows.append(f"| {r['label']} | " + " | ".join(cells) + f" | {'–' if lam is None else f'{lam:.3f}'} | "
                    f"{'–' if lp is None or not lc else f'{lp / lc:.3f}'} |")
    base = summary.get("base_training") or []
    t = summary.get("timings", {})
    tested = decisions(results, alpha)
    n_sig = sum(d["significant"] for d in tested.values())
    lines = [
        "# Toy world: PureCC vs L_CC only",
        "",
        f"Every method ran with training seeds {', '.join(map(str, seeds))}; every run is sampled with the same "
        f"{toy['evaluation']['samples']} prompts per prompt set and the same initial noise. A cell is the mean over "
        "seeds ± the standard deviation across seeds (the base model is one model: its cells are single values). "
        "Drift is the mean squared pixel difference (images in [0, 1]) to the base model's image for the same "
        "prompt and noise.",
        "",
        *rows,
        "",
        "## PureCC against L_CC only",
        f"Two-sided Welch's t-test on the per-seed rates; a difference counts at p < {alpha:g}.",
        "",
        *(comparison(results, alpha) or ["(needs the lcc and purecc runs)"]),
        "",
        "## Findings",
        f"Every comparison is a two-sided t-test across seeds at α = {alpha:g} (Welch's between methods, one-sample "
        f"against the base model), without correction for multiple tests: of the {len(tested)} tests in "
        f"report.json, {n_sig} are significant, and about {alpha * len(tested):.1f} would be by chance alone.",
        "",
        *(findings(results, alpha) or ["(needs the lcc and purecc runs)"]),
        "",
        "## Base model",
        f"The base model was {summary.get('base_origin', '?')}."
        + (f" Pretraining: {base[-1]['step']} steps, final loss {base[-1]['loss']:.4f}." if base else ""),
        "",
        *base_accuracy(((results.get("base") or {}).get("runs") or {}).get("base", {}).get("scores", {})),
        "",
        "## Machine",
        machine.summary(summary["machine"]) + "." if summary.get("machine") else "(not recorded)",
        "",
        "## Time (seconds, wall clock on that machine and load)",
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
    for name in results:
        fid, leak = per_seed(results, name, "fidelity_other"), per_seed(results, name, "class_prior_striped")
        if not fid or not leak:
            continue
        (mx, sx), (my, sy) = stats.mean_sd([1 - x for x in leak]), stats.mean_sd(fid)
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", capsize=3)
        ax.annotate(name, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("preservation: 1 - P(striped | 'a square on ...')")
    ax.set_ylabel("fidelity: P(concept | 'a sks square on <other bg>')")
    ax.set_title("fidelity vs preservation (mean ± sd over seeds)")
    for name, r in results.items():
        for seed, run in (r.get("runs") or {}).items():
            curves = run.get("curves") or []
            steps = [c["step"] for c in curves if "lambda_mean" in c]
            if steps and "fixed" not in name:  # fixed λ runs are flat lines at their λ
                first = seed == next(iter(r["runs"]))
                axes[1].plot(steps, [c["lambda_mean"] for c in curves if "lambda_mean" in c], lw=0.8,
                             label=name if first else None, color=f"C{list(results).index(name) % 10}")
                axes[2].plot(steps, [c["l_pure"] for c in curves if "l_pure" in c], lw=0.8,
                             label=f"{name} L_PureCC" if first else None, color=f"C{list(results).index(name) % 10}")
    for name in ("purecc",):
        for seed, run in ((results.get(name) or {}).get("runs") or {}).items():
            curves = run.get("curves") or []
            axes[2].plot([c["step"] for c in curves], [c["l_cc"] for c in curves], "k--", lw=0.8,
                         label="purecc L_CC" if seed == next(iter(results[name]["runs"])) else None)
    axes[1].set_title("adaptive λ* (batch mean) during stage B, every seed")
    axes[1].set_xlabel("step")
    axes[2].set_title("loss terms, every seed")
    axes[2].set_xlabel("step")
    axes[2].set_yscale("log")
    for a in axes[1:]:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir: Path, summary: dict[str, Any]) -> None:
    alpha = summary["config"]["toy"].get("alpha", stats.ALPHA)
    summary = {**summary, "tests": decisions(summary["results"], alpha)}
    (workdir / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    (workdir / "report.md").write_text(markdown(summary))
    plot(summary, workdir / "report.png")


def _load(workdir: str | Path) -> dict[str, Any]:
    path = Path(workdir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the toy world into {workdir} first")
    return json.loads(path.read_text())


def rewrite(workdir: str | Path) -> None:
    """report.md and report.png again from workdir/report.json (after a change to this module)."""
    write(Path(workdir), _load(workdir))


# What a run measured about time and the machine, not what it computed.
CLOCK_KEYS = ("timings", "machine", "steps_per_second")


def _numbers(tree: Any) -> Any:
    """`tree` without `CLOCK_KEYS`, at any depth."""
    if isinstance(tree, dict):
        return {k: _numbers(v) for k, v in tree.items() if k not in CLOCK_KEYS}
    if isinstance(tree, list):
        return [_numbers(v) for v in tree]
    return tree


def digest(summary: dict[str, Any]) -> str:
    """sha256 of what a run computed: every score, test and training curve of report.json, without
    `CLOCK_KEYS` (wall-clock timings, the machine's load, steps per second) and the config it echoes.
    Two runs whose float rounding agrees have the same digest."""
    import hashlib

    kept = {k: v for k, v in summary.items() if k != "config"}
    return hashlib.sha256(json.dumps(_numbers(kept), sort_keys=True, default=float).encode()).hexdigest()


def agreement(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two runs (e.g. on different CPUs) reach different significance decisions."""
    alpha = a["config"]["toy"].get("alpha", stats.ALPHA)
    da, db = decisions(a["results"], alpha), decisions(b["results"], alpha)
    out = []
    for key in sorted(set(da) | set(db)):
        x, y = da.get(key), db.get(key)
        if x is None or y is None:
            out.append(f"{key}: tested in only one run")
        elif x["significant"] != y["significant"]:
            out.append(f"{key}: first run {x['diff']:+.3f} (p = {x['p']:.3f}), second {y['diff']:+.3f} "
                       f"(p = {y['p']:.3f})")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--digest":
        print(digest(_load(sys.argv[2])))
    elif len(sys.argv) == 2:
        rewrite(sys.argv[1])
    elif len(sys.argv) == 3:
        first, second = _load(sys.argv[1]), _load(sys.argv[2])
        diff = agreement(first, second)
        n = len(decisions(first["results"], first["config"]["toy"].get("alpha", stats.ALPHA)))
        print(f"{n} tests; {len(diff)} differ between the runs" + (":\n" + "\n".join(diff) if diff else "."))
    else:
        sys.exit("usage: python -m purecc_jax.toyworld.report WORKDIR [OTHER_WORKDIR] | --digest WORKDIR")
