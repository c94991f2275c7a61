"""Comparison reports: standard errors in the table, paired differences between editors."""

import random

from pipelines.report import comparison_table, paired_difference, paired_table, write_reports


def fake_summary(efficacy: list[float], k: int = 10) -> dict:
    n = len(efficacy)
    p = sum(efficacy) / n
    final = {"efficacy": p, "efficacy_se": (p * (1 - p) / n) ** 0.5, "anchor_deviation": 0.01}
    scores = {"edits": list(range(n)), "efficacy": efficacy, "generalization": efficacy,
              "specificity": [1.0] * n, "retention_efficacy": efficacy[:k]}
    return {"final": final, "unedited": {"efficacy": 0.3}, "retention_first_k": k,
            "edits_per_second": 1.0, "final_scores": scores,
            "history": [{"edits": n, **final}]}


def test_paired_difference_finds_a_real_gap_and_not_a_null_one():
    rng = random.Random(0)
    a = [float(rng.random() < 0.9) for _ in range(300)]
    b = [x if rng.random() < 0.8 else 0.0 for x in a]      # b loses about 18% of a's hits
    mean, low, high = paired_difference(a, b)
    assert abs(mean - (sum(a) - sum(b)) / 300) < 1e-12
    assert 0 < low < mean < high
    mean, low, high = paired_difference(a, a)
    assert mean == low == high == 0.0
    c = a[1:] + a[:1]                                          # same rate, other edits
    mean, low, high = paired_difference(a, c)
    assert low < 0 < high
    assert paired_difference([1.0, float("nan")], [0.0, 1.0])[0] == 1.0   # NaN pair left out


def test_reports_carry_errors_and_paired_rows(tmp_path):
    rng = random.Random(1)
    strong = [float(rng.random() < 0.95) for _ in range(200)]
    weak = [x if rng.random() < 0.7 else 0.0 for x in strong]
    summaries = {"rlsedit": fake_summary(strong), "memit": fake_summary(weak)}
    table = comparison_table(summaries)
    assert f"{summaries['rlsedit']['final']['efficacy']:.3f} ± " in table
    paired = paired_table(summaries)
    row = next(line for line in paired.splitlines() if line.startswith("| rlsedit − memit"))
    assert row.split("|")[2].strip().endswith("*")           # efficacy gap: interval excludes 0
    assert not row.split("|")[4].strip().endswith("*")       # specificity equal: no mark
    files = write_reports(summaries, tmp_path, "m", "test")
    assert "Paired differences" in files["table_md"].read_text()
    assert files["deviation"].exists()
