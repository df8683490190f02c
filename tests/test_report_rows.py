"""server/report.py: what each results row says, qualifiers included, and the rows' order."""

from __future__ import annotations

from amalgam.server.report import ordered_rows, row_label


def test_rows_say_their_rule_and_whether_the_class_priors_were_aligned():
    assert row_label("ensemble:mean") == "teachers' ensemble, mean rule"
    assert (
        row_label("ensemble:mean:aligned") == "teachers' ensemble, mean rule, class priors aligned"
    )
    assert row_label("student:consensus:unaligned") == (
        "student trained with the consensus rule, class priors as answered"
    )
    assert row_label("student:restricted-fit:threshold-alone") == (
        "student trained with the restricted-fit rule, threshold-alone"
    )
    assert row_label("teacher:party-0") == "this party's teacher alone"
    assert row_label("something-else") == ""


def test_rows_come_teachers_first_then_ensembles_baselines_and_students():
    rows = ["student", "ensemble:mean:aligned", "vanilla_kd", "teacher:a", "ensemble", "supervised"]
    assert ordered_rows(dict.fromkeys(rows, 0.5)) == [
        "teacher:a", "ensemble:mean:aligned", "ensemble", "vanilla_kd", "student", "supervised"
    ]  # fmt: skip
