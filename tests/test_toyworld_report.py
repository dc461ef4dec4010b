"""The toy report's tables, tests and findings are computed from the per-seed numbers."""

import math

import pytest

from purecc_jax.toyworld import report, stats

SEEDS = ("0", "1", "2", "3")


def _arm(label, paired_with=None, curves=None, checkpoints=None, **rates):
    """An arm whose metric k has per-seed values rates[k] (one run per seed)."""
    runs = {}
    for i, seed in enumerate(SEEDS[:len(next(iter(rates.values())))]):
        scores = {k: {"rate": v[i], "se": 0.05, "n": 100} for k, v in rates.items()}
        runs[seed] = {"scores": scores, "curves": curves or []}
        if checkpoints is not None:
            runs[seed]["checkpoints"] = checkpoints[i]
    return {"label": label, "runs": runs, "paired_with": paired_with}


def _results(prior_world=(0.95, 0.96, 0.94, 0.95)):
    base_scores = {"world_all": {"rate": 1.0, "se": 0.0, "n": 100},
                   "world_shape_square": {"rate": 0.85, "se": 0.05, "n": 20},
                   "world_by_combination": {"white circle on a green background": {
                       "shape": {"rate": 0.25, "se": 0.2, "n": 4}, "all": {"rate": 0.0, "se": 0.0, "n": 4}}}}
    common = dict(purity_other=(0.40, 0.45, 0.42, 0.41), segcons_iou=(0.6, 0.62, 0.61, 0.6),
                  segcons_background=(0.7, 0.7, 0.71, 0.69), fidelity_plain=(0.70, 0.72, 0.68, 0.71),
                  drift_world=(0.02, 0.021, 0.019, 0.02))
    return {
        "base": {"label": "base", "runs": {"base": {"scores": base_scores}}},
        "lcc": _arm("lcc", plain_gray=(0.90, 0.85, 0.95, 0.88), world_all=(0.80, 0.82, 0.78, 0.81), **common),
        "prior": _arm("prior", plain_gray=(0.88, 0.86, 0.93, 0.9), world_all=prior_world, **common),
        # PureCC on lcc's stage A: a small, consistent cut in absorption per seed (only a paired test sees it)
        "purecc": _arm("purecc", "lcc", [{"step": s, "lambda_mean": 0.1, "l_pure": 0.01, "l_cc": 0.5,
                                          "grad_share": 0.02, "cos_learn_tar": 0.3} for s in range(0, 50, 10)],
                       plain_gray=(0.87, 0.82, 0.92, 0.85), world_all=(0.80, 0.82, 0.78, 0.81), **common),
    }


def test_paired_where_arms_share_stage_a():
    r = _results()
    assert report._paired(r, "purecc", "lcc") and not report._paired(r, "prior", "lcc")
    rows = {(x["a"], x["b"], x["key"]): x for x in report.family_tests(r, report.PRIMARY, 0.05)}
    gray = rows[("purecc", "lcc", "plain_gray")]
    assert gray["test"] == "paired" and gray["diff"] == pytest.approx(-0.03) and gray["p"] < 1e-6
    welch = stats.welch([0.87, 0.82, 0.92, 0.85], [0.88, 0.86, 0.93, 0.9])
    assert rows[("purecc", "prior", "plain_gray")]["p"] == pytest.approx(welch.p)
    assert gray["low"] < -0.03 < gray["high"]


def test_holm_within_each_family_and_verdicts():
    r = _results()
    rows = report.family_tests(r, report.PRIMARY, 0.05)
    assert [x["p_holm"] for x in rows] == pytest.approx(stats.holm([x["p"] for x in rows]))
    gray = next(x for x in rows if x["b"] == "lcc" and x["key"] == "plain_gray")
    assert gray["significant"] and gray["better"] and not gray["worse"]  # lower absorption is better
    control = report.family_tests(r, report.CONTROL, 0.05)
    world = next(x for x in control if x["key"] == "world_all")
    assert world["better"] and world["test"] == "Welch"


def test_findings_follow_the_tests():
    lines = report.findings(_results(), 0.05)
    text = "\n".join(lines)
    assert "Positive control" in text and "toy detects the standard preservation method" in text
    assert "PureCC beats DreamBooth-LoRA on this toy world" in text
    assert "λ* 0.100, cos(R_learn, R_tar) 0.300, η‖∇L_PureCC‖ / ‖∇L_CC‖ 0.020" in text
    same = _results(prior_world=(0.80, 0.82, 0.78, 0.81))
    assert "Not even the standard preservation method" in "\n".join(report.findings(same, 0.05))
    # checkpoints scored, but PureCC's runs never reach DreamBooth-LoRA's fidelity: the rule's
    # equal-fidelity half cannot be tested, so the end-of-training win alone does not conclude
    r = _results()
    low = {"100": {"fidelity_plain": {"rate": 0.1}, "plain_gray": {"rate": 0.9}},
           "200": {"fidelity_plain": {"rate": 0.2}, "plain_gray": {"rate": 0.9}}}
    for arm in ("lcc", "purecc", "prior"):
        for run in r[arm]["runs"].values():
            run["checkpoints"] = low if arm != "lcc" else {"100": {"fidelity_plain": {"rate": 0.9},
                                                                   "plain_gray": {"rate": 0.9}}}
    text = "\n".join(report.findings(r, 0.05))
    assert "Against DreamBooth-LoRA, not met: at the end of training PureCC is purer" in text
    assert "By that rule, PureCC does not beat either baseline" in text


def test_equal_fidelity_interpolates_along_checkpoints():
    checkpoints = {"100": {"fidelity_plain": {"rate": 0.4}, "plain_gray": {"rate": 0.5}},
                   "200": {"fidelity_plain": {"rate": 0.8}, "plain_gray": {"rate": 0.9}},
                   "300": {"fidelity_plain": {"rate": 0.9}, "plain_gray": {"rate": 0.95}}}
    assert report.at_fidelity(checkpoints, "plain_gray", 0.6) == pytest.approx(0.7)
    assert report.at_fidelity(checkpoints, "plain_gray", 0.3) == 0.5  # already above at the first one
    assert report.at_fidelity(checkpoints, "plain_gray", 0.95) is None  # never reached
    r = _results()
    r["purecc"] = _arm("purecc", "lcc", checkpoints=[checkpoints] * 4, plain_gray=(0.8,) * 4,
                       fidelity_plain=(0.9,) * 4)
    r["lcc"] = _arm("lcc", checkpoints=[checkpoints] * 4, plain_gray=(0.9,) * 4, fidelity_plain=(0.7, 0.7, 0.7, 0.7))
    assert report.fidelity_level(r) == pytest.approx(0.7)
    values = report.per_seed_at_fidelity(0.7)(r, "purecc", "plain_gray")
    assert values == {s: pytest.approx(0.8) for s in SEEDS}
    keys = report.decisions(r, 0.05)
    assert any("at fidelity 0.70" in k for k in keys)
    low = {"100": {"fidelity_plain": {"rate": 0.2}}, "200": {"fidelity_plain": {"rate": 0.5}}}
    r["prior"] = _arm("prior", checkpoints=[checkpoints, low, low, checkpoints], plain_gray=(0.8,) * 4)
    assert report.fidelity_coverage(r, 0.7) == {"lcc": (4, 4), "prior": (2, 4), "purecc": (4, 4)}
    assert "| DreamBooth-LoRA + prior preservation | 2 of 4 |" not in report.markdown(
        {"config": {"toy": {"evaluation": {"samples": 50}}}, "results": _results()})  # no checkpoints: no table
    text = report.markdown({"config": {"toy": {"evaluation": {"samples": 50}}}, "results": r})
    assert "## Equal fidelity: which runs reach fidelity 0.70" in text and "| prior | 2 of 4 |" in text


def test_detectable_difference_shrinks_with_spread():
    r = _results()
    d = report.detectable(r, "purecc", "lcc", "plain_gray")
    assert 0 < d < 0.01  # the paired differences barely vary
    assert report.detectable(r, "purecc", "prior", "plain_gray") > 0.05


def test_decisions_and_agreement_between_runs():
    a, b = _results(), _results(prior_world=(0.80, 0.82, 0.78, 0.81))
    summary = lambda r: {"results": r, "config": {"toy": {"alpha": 0.05}}}  # noqa: E731
    assert report.agreement(summary(a), summary(a)) == []
    diff = report.agreement(summary(a), summary(b))
    assert diff and all("prior" in line.split(" | ", 1)[1].split(":", 1)[0] for line in diff)


def test_markdown_sections():
    summary = {"results": _results(), "config": {"toy": {"evaluation": {"samples": 50}, "seeds": [0, 1, 2, 3],
                                                         "alpha": 0.05}},
               "base_origin": "shipped with the package (sha256 abc)",
               "machine": {"cpu": "Test CPU", "isa": ["avx2"], "cpus_usable": 2, "jax": "0.0", "jaxlib": "0.0",
                           "backend": "cpu", "xla_flags": "--xla_cpu_max_isa=AVX2", "python": "3.11", "os": "Linux",
                           "load_start": (1.0, 2.0, 3.0), "load_end": (4.0, 5.0, 6.0)}}
    md = report.markdown(summary)
    for section in ("## Primary: PureCC against the baselines", "## Positive control", "## Findings",
                    "## How strongly the PureCC term acted", "## What this many seeds can show", "## Base model",
                    "## Machine"):
        assert section in md
    assert "Test CPU (2 usable cores; ISA flags: avx2)" in md and "--xla_cpu_max_isa=AVX2" in md
    assert "| shape, asked for a square | 0.85 ± 0.05 (n = 20) | ≥ 0.90 | **no** |" in md
    assert "| white circle on a green background | 0.25 | 0.00 | 4 |" in md
    assert "| lcc | 0.90 ± 0.04 |" in md and math.isfinite(report.final_curve(summary["results"], "purecc", "l_cc"))


def test_digest_is_what_was_computed_not_when():
    """Two runs with other timings, machine load and steps per second, and a config with one more key,
    have one digest; a score moved in its last digit changes it."""
    curves = [{"step": 10, "loss": 0.5, "steps_per_second": 30.0}]
    run = lambda sps, t, load, rate, extra=(): {
        "config": {"toy": {"alpha": 0.05}, **dict(extra)},
        "results": {"lcc": {"label": "lcc", "runs": {"0": {
            "scores": {"world_all": {"rate": rate, "se": 0.1, "n": 50}},
            "curves": [dict(c, steps_per_second=sps) for c in curves]}}}},
        "timings": {"total": t}, "machine": {"load_end": load}}
    a = report.digest(run(30.0, 100.0, 0.5, 0.81))
    assert a == report.digest(run(12.5, 240.0, 2.0, 0.81, {"model": {"backbone": "auto"}}))
    assert a != report.digest(run(30.0, 100.0, 0.5, 0.8100000001))


def _study(results, seeds):
    """A study summary holding only `seeds` of every arm (as one process of a split study writes it)."""
    out = {arm: dict(e, runs={s: r for s, r in e["runs"].items() if arm == "base" or s in seeds})
           for arm, e in results.items()}
    return {"config": {"toy": {"study": True, "study_seeds": list(seeds), "alpha": 0.05}, "lr": 1e-3},
            "results": out, "timings": {"total": 1.0}, "machine": {"cpu": "x"}}


def test_merge_joins_the_seeds_of_studies_run_apart():
    r = _results()
    merged = report.merge([_study(r, ("0", "1")), _study(r, ("3", "2"))])
    assert merged["config"]["toy"]["study_seeds"] == [0, 1, 2, 3]
    for arm in ("lcc", "prior", "purecc"):
        assert list(merged["results"][arm]["runs"]) == ["0", "1", "2", "3"]
        assert merged["results"][arm]["runs"] == r[arm]["runs"]
    assert report.decisions(merged["results"], 0.05) == report.decisions(r, 0.05)  # the same tests as one study
    assert set(merged["timings"]) == {"total@0", "total@1"}


def test_merge_command_writes_the_joined_report(tmp_path, monkeypatch):
    import json
    import sys

    r = _results()
    for name, seeds in (("a", ("0", "1")), ("b", ("3", "2"))):
        (tmp_path / name).mkdir()
        summary = _study(r, seeds)
        summary["config"]["toy"]["evaluation"] = {"samples": 50}
        (tmp_path / name / "study_partial.json").write_text(json.dumps(summary))
    monkeypatch.setattr(sys, "argv", ["report", "--merge", str(tmp_path / "out"), str(tmp_path / "a"),
                                      str(tmp_path / "b")])
    import runpy

    runpy.run_module("purecc_jax.toyworld.report", run_name="__main__")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "training seeds 0, 1, 2, 3" in text
    assert json.loads((tmp_path / "out" / "report.json").read_text())["config"]["toy"]["study_seeds"] == [0, 1, 2, 3]


def test_merge_refuses_what_is_not_one_study():
    r = _results()
    a, b = _study(r, ("0", "1")), _study(r, ("1", "2"))
    with pytest.raises(ValueError, match="arm lcc seed.*'1'.*more than one study"):
        report.merge([a, b])
    other = _study(r, ("2", "3"))
    other["config"]["lr"] = 2e-3
    with pytest.raises(ValueError, match=r"another config \(keys \['lr'\]\)"):
        report.merge([a, other])
    other = _study(r, ("2", "3"))
    other["results"]["base"] = {"label": "base", "runs": {"base": {"scores": {"world_all": {"rate": 0.5}}}}}
    with pytest.raises(ValueError, match="base model scores differ"):
        report.merge([a, other])
