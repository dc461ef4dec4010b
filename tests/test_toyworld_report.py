"""The toy report's noise floor, comparisons and findings are computed from the numbers."""

from purecc_jax.toyworld import report


def _scores(**rates):
    return {k: {"rate": v, "se": 0.02} for k, v in rates.items()}


def _results(lam=0.05, l_pure=0.02, sg_leak=0.2):
    curves = [{"step": s, "lambda_mean": lam, "l_pure": l_pure, "l_cc": 1.0} for s in range(0, 50, 10)]
    return {
        "base": {"label": "base", "scores": _scores(world_all=0.7, class_prior_striped=0.0)},
        "lcc": {"label": "lcc", "scores": _scores(fidelity_ref=0.6, fidelity_other=0.1, class_prior_striped=0.5,
                                                   world_all=0.3)},
        "lcc_seed1": {"label": "lcc1", "scores": _scores(fidelity_ref=0.7, fidelity_other=0.15,
                                                          class_prior_striped=0.5, world_all=0.25)},
        "purecc": {"label": "purecc", "curves": curves,
                   "scores": _scores(fidelity_ref=0.6, fidelity_other=0.1, class_prior_striped=0.4, world_all=0.2)},
        "purecc_sg": {"label": "sg", "scores": _scores(fidelity_ref=0.3, fidelity_other=0.1,
                                                       class_prior_striped=sg_leak, world_all=0.2)},
    }


def test_noise_floor_is_the_seed_difference():
    floor = report.noise_floor(_results())
    assert abs(floor["fidelity_ref"] - 0.1) < 1e-9 and abs(floor["fidelity_other"] - 0.05) < 1e-9


def test_findings_follow_the_numbers():
    results = _results()
    text = "\n".join(report.findings(results, report.noise_floor(results)))
    assert "λ* averages 0.050" in text and "2.0% of L_CC" in text and "too weak" in text
    assert "0.20 vs 0.40 (-0.20, beyond the noise" in text  # stop-grad leak against PureCC
    assert "towards the concept." in text and "within the noise." not in text.split("Gradient")[1].split("\n")[0]
    assert "absorbed by every method" in text and "damages" in text
    assert "Fixed λ" not in text and "Layer-wise" not in text  # runs that are missing get no sentence

    results = _results(lam=0.8, l_pure=0.3, sg_leak=0.6)
    text = "\n".join(report.findings(results, report.noise_floor(results)))
    assert "noticeable size" in text and "towards the concept" not in text


def test_markdown_has_the_findings_section():
    md = report.markdown({"results": _results(), "config": {"toy": {"evaluation": {"samples": 50}}}})
    assert "## Findings" in md and "## Differences beyond the noise floor" in md
