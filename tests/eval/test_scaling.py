import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.plan import scaling
from lmforge.plan.scaling import Point


def _synthetic(alpha=0.34, beta=0.28):
    E, A, B = 1.7, 400.0, 410.0
    pts = []
    for C in [1e18, 1e19, 1e20, 1e21]:
        for N in np.geomspace(1e7, 1e10, 9):
            D = C / (6 * N)
            pts.append(Point(N, D, C, E + A / N**alpha + B / D**beta, budget=C))
    return pts


def test_isoflop_fit_recovers_the_exponents_of_a_known_law(tmp_path):
    alpha, beta = 0.34, 0.28
    res = scaling.fit_scaling(_synthetic(alpha, beta), target_flops=1e23)
    a = res["power_laws"]["N_opt"]["exponent"]
    b = res["power_laws"]["D_opt"]["exponent"]
    assert abs(a - beta / (alpha + beta)) < 0.03 and abs(b - alpha / (alpha + beta)) < 0.03
    assert abs(a + b - 1.0) < 1e-6  # D = C / 6N at every point
    t = res["target"]
    assert t["n_opt"] * t["d_opt"] * 6 == pytest.approx(1e23, rel=0.02)
    assert t["tokens_per_param"] == pytest.approx(t["d_opt"] / t["n_opt"])
    j, png, md = scaling.save_fit(res, _synthetic(), tmp_path)
    assert png.is_file() and "N_opt(C)" in md.read_text() and json.loads(j.read_text())["power_laws"]


def test_unusable_budgets_are_reported_not_fitted():
    pts = [Point(1e6, 1e6, 1e12, 3.0, budget=1e12), Point(2e6, 5e5, 1e12, 2.9, budget=1e12)]
    pts += [Point(n, 1e12 / (6 * n), 1e13, 3.0 - 0.1 * np.log(n), budget=1e13) for n in (1e6, 2e6, 4e6)]  # concave/linear
    res = scaling.fit_scaling(pts)
    reasons = [r.get("reason", "") for r in res["isoflop"]]
    assert "fewer than 3" in reasons[0] and "not convex" in reasons[1]
    assert res["power_laws"] is None and "power laws need" in res["note"]


def test_lmforge_scale_grid_then_fit_from_run_logs(tokens_dir, tmp_path, capsys):
    out = tmp_path / "scale"
    rc = main(["scale", "--tokens", str(tokens_dir), "--widths", "16,32,48", "--budgets", "2e8,4e8", "--out", str(out),
               "--target", "1e15", "--scale.seq_len=64", "--scale.batch_size=4"])
    assert rc == 0
    fit = json.loads((out / "scaling_fit.json").read_text())
    assert len(fit["points"]) == 6 and {p["budget"] for p in fit["points"]} == {2e8, 4e8}
    for p in fit["points"]:
        assert abs(p["flops"] - p["budget"]) / p["budget"] < 0.35 and p["loss"] > 0
    assert (out / "scaling.png").is_file() and "budget C" in capsys.readouterr().out
    runs = sorted(str(p) for p in (out / "runs").iterdir())
    assert main(["scale", "--runs", *runs, "--out", str(tmp_path / "fromruns")]) == 0
    fit2 = json.loads((tmp_path / "fromruns" / "scaling_fit.json").read_text())
    assert fit2["n_points"] >= 6 and all(p["label"] for p in fit2["points"])


def test_scale_config_errors(tmp_path, capsys):
    assert main(["scale", "--tokens", str(tmp_path), "--widths", "16,32"]) == 2
    assert "at least 3 model sizes" in capsys.readouterr().err
    assert main(["scale", "--tokens", str(tmp_path), "--budgets", "1e9,abc"]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["scale", "--runs", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
