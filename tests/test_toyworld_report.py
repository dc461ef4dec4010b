"""The toy report's table, tests and findings are computed from the per-seed numbers."""

import pytest

from purecc_jax.toyworld import report


def _method(label, curves=None, **rates):
    """A method whose metric k has per-seed rates rates[k] (one run per seed)."""
    n = len(next(iter(rates.values())))
    runs = {}
    for i in range(n):
        scores = {k: {"rate": v[i], "se": 0.05, "n": 50} for k, v in rates.items()}
        runs[str(i)] = {"scores": scores, "curves": curves or []}
    return {"label": label, "runs": runs}


def _curves(lam, l_pure, l_cc=1.0):
    return [{"step": s, "lambda_mean": lam, "l_pure": l_pure, "l_cc": l_cc} for s in range(0, 50, 10)]


def _results(sg_leak=(0.20, 0.22, 0.18), eta_sg_world=(0.50, 0.55, 0.52)):
    return {
        "base": {"label": "base", "runs": {"base": {"scores": {
            "world_all": {"rate": 0.90, "se": 0.04, "n": 50}, "class_prior_striped": {"rate": 0.0, "se": 0, "n": 50},
            "world_shape_square": {"rate": 0.85, "se": 0.05, "n": 20},
            "world_by_combination": {"white circle on a green background": {
                "shape": {"rate": 0.25, "se": 0.2, "n": 4}, "all": {"rate": 0.0, "se": 0.0, "n": 4}}}}}}},
        "lcc": _method("lcc", fidelity_ref=(0.60, 0.70, 0.65), fidelity_other=(0.10, 0.15, 0.12),
                       class_prior_striped=(0.50, 0.45, 0.55), world_all=(0.50, 0.55, 0.45)),
        "purecc": _method("purecc", _curves(0.05, 0.02), fidelity_ref=(0.62, 0.68, 0.60),
                          fidelity_other=(0.10, 0.12, 0.14), class_prior_striped=(0.40, 0.50, 0.45),
                          world_all=(0.52, 0.48, 0.50)),
        "purecc_sg": _method("sg", fidelity_ref=(0.30, 0.32, 0.28), fidelity_other=(0.05, 0.05, 0.06),
                             class_prior_striped=sg_leak, world_all=(0.50, 0.50, 0.52)),
        "purecc_eta100": _method("eta100", _curves(0.05, 0.01), fidelity_ref=(0.40, 0.45, 0.42),
                                 fidelity_other=(0.10, 0.10, 0.12), class_prior_striped=(0.30, 0.30, 0.35),
                                 world_all=(0.10, 0.12, 0.08), drift_world=(0.02, 0.025, 0.022)),
        "purecc_eta100_sg": _method("eta100 sg", _curves(0.05, 0.01), fidelity_ref=(0.40, 0.45, 0.42),
                                    fidelity_other=(0.10, 0.10, 0.12), class_prior_striped=(0.30, 0.30, 0.35),
                                    world_all=eta_sg_world, drift_world=(0.005, 0.006, 0.004)),
    }


def test_per_seed_and_cells():
    results = _results()
    assert report.per_seed(results, "lcc", "fidelity_ref") == [0.60, 0.70, 0.65]
    assert report.per_seed(results, "base", "world_all") == [0.90]
    assert report.per_seed(results, "missing", "world_all") == []
    assert report._cell([0.60, 0.70, 0.65]) == "0.65 ± 0.05"
    assert report._cell([0.90]) == "0.90"
    assert report.final_curve(results, "purecc", "lambda_mean") == pytest.approx(0.05)


def test_versus_states_p_and_decision():
    results = _results()
    # fidelity 0.30/0.32/0.28 vs 0.62/0.68/0.60: Welch's t = -10.6 on df 3.3, p = 0.0013
    text = report.versus(results, "purecc_sg", "purecc", "fidelity_ref", 0.05)
    assert text.startswith("0.30 vs 0.63 (-0.33, p = 0.001: significant at 0.05)")
    # PureCC vs L_CC on fidelity: overlapping seeds
    assert "not significant" in report.versus(results, "purecc", "lcc", "fidelity_ref", 0.05)
    # a method against the single base model: one-sample test
    r = report.test(results, "lcc", "base", "world_all")
    assert r.df == 2 and r.diff == pytest.approx(-0.40) and r.significant(0.05)


def test_findings_follow_the_tests():
    results = _results()
    text = "\n".join(report.findings(results, 0.05))
    assert "λ* averages 0.050" in text and "2.0% of L_CC" in text and "too weak" in text
    assert "No difference is significant" in text  # PureCC vs L_CC
    assert "damage to concept-free prompts comes through v_b" in text  # η = 100 with vs without stop-grad
    assert "η·L_PureCC / L_CC = 1.00" in text
    assert "damages what the base model could do" in text
    assert "Fixed λ" not in text and "Layer-wise" not in text  # runs that are missing get no sentence

    # stopping the gradient through v_b changes nothing at η = 100: the hypothesis is not supported
    results = _results(eta_sg_world=(0.10, 0.08, 0.12))
    results["purecc_eta100_sg"]["runs"]["0"]["scores"]["drift_world"]["rate"] = 0.02
    results["purecc_eta100_sg"]["runs"]["1"]["scores"]["drift_world"]["rate"] = 0.025
    results["purecc_eta100_sg"]["runs"]["2"]["scores"]["drift_world"]["rate"] = 0.022
    text = "\n".join(report.findings(results, 0.05))
    assert "not supported by this measurement" in text and "damage to concept-free prompts comes through" not in text


def test_decisions_and_agreement_between_runs():
    a, b = _results(), _results(sg_leak=(0.40, 0.50, 0.45))
    da = report.decisions(a, 0.05)
    assert da["purecc_sg vs purecc: class_prior_striped"]["significant"]
    assert not da["purecc vs lcc: fidelity_ref"]["significant"]
    summary = lambda r: {"results": r, "config": {"toy": {"alpha": 0.05}}}
    assert report.agreement(summary(a), summary(a)) == []
    diff = report.agreement(summary(a), summary(b))
    assert len(diff) == 1 and diff[0].startswith("purecc_sg vs purecc: class_prior_striped")


def test_markdown_sections():
    summary = {"results": _results(), "config": {"toy": {"evaluation": {"samples": 50}, "seeds": [0, 1, 2],
                                                         "alpha": 0.05}},
               "base_origin": "shipped with the package (sha256 abc)",
               "machine": {"cpu": "Test CPU", "isa": ["avx2"], "cpus_usable": 2, "jax": "0.0", "jaxlib": "0.0",
                           "backend": "cpu", "xla_flags": "--xla_cpu_max_isa=AVX2", "python": "3.11", "os": "Linux",
                           "load_start": (1.0, 2.0, 3.0), "load_end": (4.0, 5.0, 6.0)}}
    md = report.markdown(summary)
    for section in ("## PureCC against L_CC only", "## Findings", "## Base model", "## Machine"):
        assert section in md
    assert "Test CPU (2 usable cores; ISA flags: avx2)" in md and "--xla_cpu_max_isa=AVX2" in md
    assert "| shape, asked for a square | 0.85 ± 0.05 (n = 20) | ≥ 0.90 | **no** |" in md
    assert "| white circle on a green background | 0.25 | 0.00 | 4 |" in md
    assert "| lcc | 0.65 ± 0.05 |" in md and "| base | – |" in md  # labels from the results


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
