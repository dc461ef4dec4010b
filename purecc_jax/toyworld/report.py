"""report.json (everything), report.md (the tables, the tests and what they show), report.png.

Every arm ran with several training seeds. A rate is the mean over seeds ± the sample standard
deviation across seeds. The comparisons and endpoints are the ones docs/toy_world.md fixes before
the study runs: each is a two-sided t-test on the per-seed values — paired where the two arms share
a stage A (the same seed's extractor), Welch's otherwise — with the 95% confidence interval of the
difference, and Holm's correction within each family of tests. The findings are written from these
numbers and tests, so they change when the numbers do.

    python -m purecc_jax.toyworld.report W           report.md and report.png again from W/report.json
    python -m purecc_jax.toyworld.report A B         which significance decisions differ between two runs
    python -m purecc_jax.toyworld.report --digest W  sha256 of what W computed (not its timings)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from purecc_jax.toyworld import machine, stats

# The endpoints (docs/toy_world.md): key, label, which direction is better (+1 higher, -1 lower).
ENDPOINTS = (
    ("plain_gray", "absorption: 'a sks square' on gray", -1),
    ("purity_other", "purity: asked background, given the concept", +1),
    ("fidelity_and_background_other", "transfer: concept on the asked other background", +1),
    ("segcons_iou", "seg-cons: object IoU with the base", +1),
    ("segcons_background", "seg-cons: background agreement", +1),
    ("fidelity_plain", "fidelity: concept for 'a sks square'", +1),
    ("world_all", "world prompts all-correct", +1),
    ("drift_world", "drift vs base (world)", -1),
)
LABELS = {k: label for k, label, _ in ENDPOINTS}
BETTER = {k: sign for k, _, sign in ENDPOINTS}
PURITY = ("plain_gray", "purity_other", "fidelity_and_background_other", "segcons_iou", "segcons_background")
PRESERVATION = ("world_all", "drift_world")
# The families of tests, each Holm-corrected on its own: (family, [(a, b), ...], endpoints).
PRIMARY = ("primary: PureCC against the baselines", [("purecc", "lcc"), ("purecc", "prior")], PURITY + PRESERVATION)
CONTROL = ("positive control: prior preservation against DreamBooth-LoRA", [("prior", "lcc")],
           PURITY + PRESERVATION)
SECONDARY = ("secondary: what each part does",
             [("eta0", "lcc"), ("purecc", "eta0"), ("purecc_noext", "lcc"), ("purecc", "purecc_noext"),
              ("authors", "lcc")], PURITY + PRESERVATION + ("fidelity_plain",))
FAMILIES = (PRIMARY, CONTROL, SECONDARY)
# The pretraining targets of the shipped base, on held-out attribute combinations.
TARGETS = {"world_background": 0.95, "world_colour": 0.95, "world_shape_circle": 0.9, "world_shape_square": 0.9,
           "world_shape_cross": 0.9}
TERM_CURVES = (("lambda_mean", "λ*"), ("cos_learn_tar", "cos(R_learn, R_tar)"),
               ("grad_share", "η‖∇L_PureCC‖ / ‖∇L_CC‖"), ("l_pure", "L_PureCC"), ("l_cc", "L_CC"))


def _value(v) -> float | None:
    if v is None:
        return None
    return float(v["rate"]) if isinstance(v, dict) else float(v)


def _runs(results: dict[str, Any], name: str) -> dict[str, Any]:
    return (results.get(name) or {}).get("runs") or {}


def per_seed(results: dict[str, Any], name: str, key: str) -> dict[str, float]:
    """seed -> the final metric of each run of an arm (runs without the metric left out)."""
    out = {}
    for seed, r in _runs(results, name).items():
        v = _value(r["scores"].get(key))
        if v is not None and math.isfinite(v):
            out[seed] = v
    return out


def final_curve(results: dict[str, Any], name: str, key: str, last: int = 5) -> float | None:
    """A training curve's value at the end (mean of its last `last` logged points), averaged over seeds."""
    ends = []
    for r in _runs(results, name).values():
        vals = [row[key] for row in r.get("curves") or [] if key in row][-last:]
        if vals:
            ends.append(float(np.mean(vals)))
    return float(np.mean(ends)) if ends else None


def _paired(results: dict[str, Any], a: str, b: str) -> bool:
    """Whether two arms share their stage A per seed (one ran stage B from the other's, or both from one)."""
    pa, pb = (results.get(a) or {}).get("paired_with"), (results.get(b) or {}).get("paired_with")
    return (pa or a) == (pb or b)


def test(values_a: dict[str, float], values_b: dict[str, float], paired: bool) -> stats.Test | None:
    """Paired on the common seeds when `paired`, else Welch's (or one-sample against a single value)."""
    if paired:
        seeds = sorted(set(values_a) & set(values_b), key=int)
        if len(seeds) < 2:
            return None
        return stats.paired([values_a[s] for s in seeds], [values_b[s] for s in seeds])
    return stats.compare(list(values_a.values()), list(values_b.values()))


def family_tests(results: dict[str, Any], family, alpha: float, values=per_seed) -> list[dict[str, Any]]:
    """Every test of a family, Holm-adjusted; `values(results, arm, key)` gives the per-seed values."""
    name, pairs, keys = family
    rows = []
    for a, b in pairs:
        for key in keys:
            va, vb = values(results, a, key), values(results, b, key)
            if not va or not vb:
                continue
            paired = _paired(results, a, b)
            r = test(va, vb, paired)
            if r is None or not math.isfinite(r.p):
                continue
            lo, hi = r.interval()
            rows.append(dict(family=name, a=a, b=b, key=key, mean_a=float(np.mean(list(va.values()))),
                             mean_b=float(np.mean(list(vb.values()))), diff=r.diff, low=lo, high=hi, p=r.p,
                             test="paired" if paired else "Welch", n=min(len(va), len(vb))))
    for row, adjusted in zip(rows, stats.holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
        row["significant"] = adjusted < alpha
        row["better"] = row["significant"] and BETTER[row["key"]] * row["diff"] > 0
        row["worse"] = row["significant"] and BETTER[row["key"]] * row["diff"] < 0
    return rows


# ----------------------------------------------------------------------------- equal fidelity


def at_fidelity(checkpoints: dict[str, Any], key: str, level: float) -> float | None:
    """A run's `key` where its fidelity first reaches `level` along its checkpoints (linear interpolation
    between the two checkpoints around the crossing; the first checkpoint's value if it is already above;
    None if the run never gets there)."""
    points = sorted((int(s), _value(c.get("fidelity_plain")), _value(c.get(key))) for s, c in checkpoints.items())
    points = [p for p in points if p[1] is not None and p[2] is not None]
    for i, (_, f, v) in enumerate(points):
        if f >= level:
            if i == 0:
                return v
            _, f0, v0 = points[i - 1]
            return v0 + (v - v0) * (level - f0) / (f - f0)
    return None


def fidelity_level(results: dict[str, Any]) -> float | None:
    """The common fidelity of the equal-fidelity comparison: the median final fidelity of DreamBooth-LoRA."""
    vals = list(per_seed(results, "lcc", "fidelity_plain").values())
    return float(np.median(vals)) if vals else None


def per_seed_at_fidelity(level: float):
    def values(results: dict[str, Any], name: str, key: str) -> dict[str, float]:
        out = {}
        for seed, r in _runs(results, name).items():
            if r.get("checkpoints"):
                v = at_fidelity(r["checkpoints"], key, level)
                if v is not None:
                    out[seed] = v
        return out
    return values


def fidelity_coverage(results: dict[str, Any], level: float) -> dict[str, tuple[int, int]]:
    """Per arm scored along its checkpoints: (runs whose fidelity reaches `level`, runs)."""
    out = {}
    for name in results:
        runs = [r for r in _runs(results, name).values() if r.get("checkpoints")]
        if runs:
            out[name] = (sum(at_fidelity(r["checkpoints"], "fidelity_plain", level) is not None for r in runs),
                         len(runs))
    return out


def decisions(results: dict[str, Any], alpha: float) -> dict[str, dict[str, Any]]:
    """Every test of every family at the end of training (and at equal fidelity, where checkpoints were
    scored), keyed "family | a vs b: key"."""
    out = {}
    level = fidelity_level(results)
    for family in FAMILIES:
        for row in family_tests(results, family, alpha):
            out[f"{row['family']} | {row['a']} vs {row['b']}: {row['key']}"] = row
        if level is not None and any(r.get("checkpoints") for n in results for r in _runs(results, n).values()):
            eq = (f"{family[0]}, at fidelity {level:.2f}", family[1], tuple(k for k in family[2]
                                                                            if k != "fidelity_plain"))
            for row in family_tests(results, eq, alpha, per_seed_at_fidelity(level)):
                out[f"{row['family']} | {row['a']} vs {row['b']}: {row['key']}"] = row
    return out


# ----------------------------------------------------------------------------- writing


def _cell(vals, digits: int = 2) -> str:
    vals = list(vals.values()) if isinstance(vals, dict) else list(vals)
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    m, s = stats.mean_sd(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _digits(key: str) -> int:
    return 4 if key.startswith("drift") else 2


def table(results: dict[str, Any]) -> list[str]:
    rows = ["| arm | " + " | ".join(label for _, label, _ in ENDPOINTS) + " |", "|" + "---|" * (len(ENDPOINTS) + 1)]
    for name, r in results.items():
        rows.append(f"| {r['label']} | " + " | ".join(_cell(per_seed(results, name, k), _digits(k))
                                                       for k, _, _ in ENDPOINTS) + " |")
    return rows


def tests_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| comparison | endpoint | means | difference [95% CI] | test | p | Holm p | |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = _digits(r["key"])
        verdict = "**better**" if r["better"] else "**worse**" if r["worse"] else "no difference shown"
        out.append(f"| {r['a']} − {r['b']} | {LABELS[r['key']]} | {r['mean_a']:.{d}f} vs {r['mean_b']:.{d}f} | "
                   f"{r['diff']:+.{d}f} [{r['low']:+.{d}f}, {r['high']:+.{d}f}] | {r['test']}, n = {r['n']} | "
                   f"{r['p']:.3f} | {r['p_holm']:.3f} | {verdict} |")
    return out


def term_strength(results: dict[str, Any]) -> list[str]:
    """How strongly the PureCC term acted: its curves at the end of stage B, per arm."""
    rows = ["| arm | " + " | ".join(label for _, label in TERM_CURVES) + " |", "|" + "---|" * (len(TERM_CURVES) + 1)]
    any_row = False
    for name, r in results.items():
        vals = [final_curve(results, name, k) for k, _ in TERM_CURVES]
        if vals[0] is None:
            continue
        any_row = True
        rows.append(f"| {r['label']} | " + " | ".join("–" if v is None else f"{v:.4g}" for v in vals) + " |")
    return rows if any_row else []


def detectable(results: dict[str, Any], a: str, b: str, key: str, power: float = 0.8, alpha: float = 0.05
               ) -> float | None:
    """The smallest true difference a two-sided test at `alpha` would find with probability `power`,
    given the seeds' spread (paired or Welch, as the comparison is tested)."""
    from scipy import special

    va, vb = per_seed(results, a, key), per_seed(results, b, key)
    if len(va) < 2 or len(vb) < 2:
        return None
    if _paired(results, a, b):
        seeds = sorted(set(va) & set(vb), key=int)
        _, sd = stats.mean_sd([va[s] - vb[s] for s in seeds])
        se, df = sd / math.sqrt(len(seeds)), len(seeds) - 1
    else:
        r = stats.welch(list(va.values()), list(vb.values()))
        se, df = r.se, r.df
    if not (math.isfinite(se) and math.isfinite(df)):
        return None
    return float((special.stdtrit(df, 1 - alpha / 2) + special.stdtrit(df, power)) * se)


def findings(results: dict[str, Any], alpha: float) -> list[str]:
    """What the tests say, written from them (a missing arm gets no sentence)."""
    out = []
    tested = decisions(results, alpha)
    by_family: dict[str, list[dict[str, Any]]] = {}
    for row in tested.values():
        by_family.setdefault(row["family"], []).append(row)

    def verdict(rows: list[dict[str, Any]], arm: str, base: str) -> str | None:
        mine = [r for r in rows if r["a"] == arm and r["b"] == base]
        if not mine:
            return None
        better = [LABELS[r["key"]] for r in mine if r["better"]]
        worse = [LABELS[r["key"]] for r in mine if r["worse"]]
        effects = "; ".join(f"{LABELS[r['key']]} {r['diff']:+.{_digits(r['key'])}f} "
                            f"[{r['low']:+.{_digits(r['key'])}f}, {r['high']:+.{_digits(r['key'])}f}]" for r in mine)
        head = (f"better on {', '.join(better)}" if better else "better on no endpoint") + (
            f", worse on {', '.join(worse)}" if worse else "")
        return f"{head} (differences with 95% intervals: {effects})"

    control = by_family.get(CONTROL[0], [])
    if control:
        detected = [r for r in control if r["significant"]]
        out.append("- **Positive control.** Prior preservation against DreamBooth-LoRA: "
                   + (verdict(control, "prior", "lcc") or "")
                   + (". The toy detects the standard preservation method's effect, so a purer method could be "
                      "seen." if detected else
                      ". Not even the standard preservation method differs significantly from DreamBooth-LoRA "
                      "here: this toy cannot show a preservation effect of that size, and a null result for "
                      "PureCC says little."))
    for family, label in ((PRIMARY[0], "at the end of training"),
                          *(((f, "at equal fidelity " + f.split("at fidelity ")[1]) for f in by_family
                             if f.startswith(PRIMARY[0] + ", at fidelity")))):
        rows = by_family.get(family, [])
        for base in ("lcc", "prior"):
            v = verdict(rows, "purecc", base)
            if v:
                name = {"lcc": "DreamBooth-LoRA", "prior": "prior preservation"}[base]
                out.append(f"- **PureCC against {name}, {label}**: {v}.")
    primary = by_family.get(PRIMARY[0], [])
    if primary:
        names = {"lcc": "DreamBooth-LoRA", "prior": "prior preservation"}
        scored = any(r.get("checkpoints") for n in results for r in _runs(results, n).values())
        equal = next((rows for f, rows in by_family.items() if f.startswith(PRIMARY[0] + ", at fidelity")), [])

        def wins(rows, b):
            return [r for r in rows if r["a"] == "purecc" and r["b"] == b and r["better"] and r["key"] in PURITY]

        def met(rows, b):
            return bool(wins(rows, b)) and not [r for r in rows if r["a"] == "purecc" and r["b"] == b
                                                and r["worse"] and r["key"] in PRESERVATION]

        parts, beats = [], []
        for b in ("lcc", "prior"):
            if not met(primary, b):
                parts.append(f"against {names[b]}, not met: no purity endpoint significantly better at the end of "
                             "training without a preservation endpoint significantly worse")
                continue
            won = ", ".join(sorted({LABELS[r["key"]] for r in wins(primary, b)}))
            if not scored:
                beats.append(b)
                parts.append(f"against {names[b]}, met at the end of training (purer on {won}; no checkpoints were "
                             "scored, so equal fidelity was not tested)")
            elif not any(r["a"] == "purecc" and r["b"] == b for r in equal):
                parts.append(f"against {names[b]}, not met: at the end of training PureCC is purer on {won} with no preservation "
                             "endpoint worse, but too few runs reach the common fidelity for the equal-fidelity "
                             "test the rule also requires")
            elif not met(equal, b):
                parts.append(f"against {names[b]}, not met: purer on {won} at the end of training, not at equal fidelity")
            else:
                beats.append(b)
                parts.append(f"against {names[b]}, met: purer on {won}, at the end of training and at equal fidelity")
        joined = "; ".join(parts)
        out.append("- **Conclusion (the rule fixed in advance).** " + joined[0].upper() + joined[1:] + f" (Holm-corrected, α = {alpha:g})."
                   + (f" By that rule, PureCC beats {' and '.join(names[b] for b in beats)} on this toy world." if beats else
                      " By that rule, PureCC does not beat either baseline on this toy world."))
    secondary = by_family.get(SECONDARY[0], [])
    for arm, base, what in (("eta0", "lcc", "A second stage alone (η = 0) against DreamBooth-LoRA"),
                            ("purecc", "eta0", "The PureCC term (η = 1 against η = 0, same two stages)"),
                            ("purecc", "purecc_noext", "The extractor with its stage-A LoRA against without"),
                            ("authors", "lcc", "The authors' code's recipe against DreamBooth-LoRA")):
        v = verdict(secondary, arm, base)
        if v:
            out.append(f"- **{what}**: {v}.")
    lam, share, cos = (final_curve(results, "purecc", k) for k in ("lambda_mean", "grad_share", "cos_learn_tar"))
    if lam is not None:
        out.append(f"- **How strongly the PureCC term acted** (adaptive λ*, end of stage B, means over seeds): λ* "
                   f"{lam:.3f}" + (f", cos(R_learn, R_tar) {cos:.3f}" if cos is not None else "")
                   + (f", η‖∇L_PureCC‖ / ‖∇L_CC‖ {share:.3f}" if share is not None else "") + ".")
    return out


def power_note(results: dict[str, Any], alpha: float) -> list[str]:
    """What this many seeds can show: the smallest differences the primary tests would detect."""
    rows = []
    for a, b in PRIMARY[1]:
        cells = []
        for key in PURITY + PRESERVATION:
            d = detectable(results, a, b, key, alpha=alpha)
            if d is not None:
                cells.append(f"{LABELS[key]} {d:.{_digits(key)}f}")
        if cells:
            rows.append(f"- {a} − {b}: " + "; ".join(cells))
    if not rows:
        return []
    n = len(_runs(results, "purecc"))
    return [f"With {n} seeds per arm, a difference this large would be detected 80% of the time (two-sided, "
            f"α = {alpha:g} before correction); smaller true differences would mostly go unseen:", "", *rows]


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
    seeds = toy.get("study_seeds") if toy.get("study") else toy.get("seeds", ())
    tested = decisions(results, alpha)
    families: dict[str, list[dict[str, Any]]] = {}
    for row in tested.values():
        families.setdefault(row["family"], []).append(row)
    base = summary.get("base_training") or []
    t = summary.get("timings", {})
    lines = [
        "# Toy world: " + ("the study" if toy.get("study") else
                           "PureCC against DreamBooth-LoRA and prior preservation"),
        "",
        f"Every arm ran with training seeds {', '.join(map(str, seeds))}; every run is sampled with the same "
        f"{toy['evaluation']['samples']} prompts per prompt set and the same initial noise. A cell is the mean over "
        "seeds ± the standard deviation across seeds (the base model is one model: its cells are single values). "
        "The endpoints are defined in docs/toy_world.md and purecc_jax/toyworld/evaluate.py.",
        "",
        *table(results),
        "",
    ]
    for family, rows in families.items():
        lines += [f"## {family[0].upper()}{family[1:]}",
                  f"Holm-corrected within this family of {len(rows)} tests, α = {alpha:g}.", "", *tests_table(rows), ""]
    level = fidelity_level(results)
    reached = fidelity_coverage(results, level) if level is not None else {}
    if reached:
        lines += [f"## Equal fidelity: which runs reach fidelity {level:.2f}",
                  "A run enters the equal-fidelity tests only if its fidelity reaches the level along its "
                  "checkpoints; a family's comparison is tested only with at least 2 runs (pairs) on each side.", "",
                  "| arm | runs reaching it |", "|---|---|",
                  *(f"| {results[n]['label']} | {k} of {m} |" for n, (k, m) in reached.items()), ""]
    strength = term_strength(results)
    if strength:
        lines += ["## How strongly the PureCC term acted", "End of the last stage (mean of the last 5 logged "
                  "points, averaged over seeds).", "", *strength, ""]
    lines += ["## Findings", "", *(findings(results, alpha) or ["(needs the lcc, prior and purecc runs)"]), ""]
    note = power_note(results, alpha)
    if note:
        lines += ["## What this many seeds can show", "", *note, ""]
    lines += [
        "## Base model",
        f"The base model was {summary.get('base_origin', '?')}."
        + (f" Pretraining: {base[-1]['step']} steps, final loss {base[-1]['loss']:.4f}." if base else ""),
        "",
        *base_accuracy(_runs(results, "base").get("base", {}).get("scores", {})),
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
    """Fidelity against purity and preservation per arm (mean ± sd over seeds), and λ* over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key in zip(axes[:2], ("purity_other", "world_all")):
        for name in results:
            fid, other = per_seed(results, name, "fidelity_plain"), per_seed(results, name, key)
            if not fid or not other:
                continue
            (mx, sx), (my, sy) = stats.mean_sd(list(fid.values())), stats.mean_sd(list(other.values()))
            ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", capsize=3)
            ax.annotate(name, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("fidelity: P(concept | 'a sks square')")
        ax.set_ylabel(LABELS[key])
        ax.set_title(f"{LABELS[key].split(':')[0]} against fidelity (mean ± sd over seeds)")
    for name, r in results.items():
        for seed, run in _runs(results, name).items():
            curves = [c for c in run.get("curves") or [] if "lambda_mean" in c]
            if curves and "fixed" not in name and name != "authors":
                axes[2].plot([c["step"] for c in curves], [c["lambda_mean"] for c in curves], lw=0.8,
                             label=name if seed == next(iter(r["runs"])) else None)
    axes[2].set_xlabel("stage B step")
    axes[2].set_ylabel("λ* (batch mean)")
    axes[2].set_title("adaptive λ* over training")
    if axes[2].lines:
        axes[2].legend(fontsize=7)
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


def _load_any(workdir: str | Path) -> dict[str, Any]:
    """A workdir's report.json, else the complete seeds of a study stopped early (study_partial.json)."""
    partial = Path(workdir) / "study_partial.json"
    if not (Path(workdir) / "report.json").is_file() and partial.is_file():
        return json.loads(partial.read_text())
    return _load(workdir)


def merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One study from studies of the same config run on different seeds (e.g. two processes, one
    counting the seeds up, one down): the union of each arm's runs. Refuses configs that differ in
    anything but the seeds, base models whose scores differ, and a seed run twice."""
    first = summaries[0]

    def setup(summary):
        config = json.loads(json.dumps(summary["config"]))
        for key in ("seeds", "study_seeds"):
            config["toy"].pop(key, None)
        return config

    results = json.loads(json.dumps(first["results"]))
    timings = {f"{k}@0": v for k, v in first["timings"].items()}
    want = setup(first)
    for i, other in enumerate(summaries[1:], 1):
        got = setup(other)
        if got != want:
            keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise ValueError(f"report --merge: study {i} ran another config (keys {keys}) than study 0")
        if _numbers(other["results"]["base"]) != _numbers(first["results"]["base"]):
            raise ValueError(f"report --merge: study {i}'s base model scores differ from study 0's")
        if set(other["results"]) != set(results):
            raise ValueError(f"report --merge: study {i} ran arms {sorted(other['results'])}, study 0 {sorted(results)}")
        for arm, entry in other["results"].items():
            if arm == "base":
                continue
            twice = set(entry["runs"]) & set(results[arm]["runs"])
            if twice:
                raise ValueError(f"report --merge: arm {arm} seed(s) {sorted(twice)} in more than one study")
            results[arm]["runs"].update(entry["runs"])
        timings.update({f"{k}@{i}": v for k, v in other["timings"].items()})
    for entry in results.values():
        if entry is not results["base"]:  # seeds in numeric order (the base's one run is "base")
            entry["runs"] = dict(sorted(entry["runs"].items(), key=lambda kv: int(kv[0])))
    seeds = sorted({int(s) for arm, e in results.items() if arm != "base" for s in e["runs"]})
    config = json.loads(json.dumps(first["config"]))
    config["toy"]["study_seeds" if config["toy"].get("study") else "seeds"] = seeds
    return {**first, "config": config, "results": results, "timings": timings,
            "machine": {**(first.get("machine") or {}), "studies": [s.get("machine") for s in summaries]}}


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
            out.append(f"{key}: first run {x['diff']:+.3f} (Holm p = {x['p_holm']:.3f}), second {y['diff']:+.3f} "
                       f"(Holm p = {y['p_holm']:.3f})")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) >= 4 and sys.argv[1] == "--merge":  # --merge OUT WORKDIR WORKDIR...
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        write(out, merge([_load_any(w) for w in sys.argv[3:]]))
        print(f"{out}/report.md: the union of {len(sys.argv) - 3} studies")
    elif len(sys.argv) == 3 and sys.argv[1] == "--digest":
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
