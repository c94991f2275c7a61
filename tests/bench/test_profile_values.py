"""`bench.profile_values` on the tiny Llama: every design runs, the table's ratios are against
the plain one, and --append records the command."""

from bench import docs, profile_values
from tests.conftest import ROOT


def test_every_design_runs_and_is_set_against_the_plain_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(docs, "DOCS", str(tmp_path / "benchmarks.md"))
    profile_values.main(["--model", "tiny-llama", "--edits", "2", "--batch-sizes", "2", "--append"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2 |")]
    assert [r[2].strip() for r in rows] == ["plain", "replay", "replay+prefix",
                                            "replay+prefix+stop"]
    assert rows[0][4].strip() == "1.0x"
    assert "python -m bench.profile_values --model tiny-llama" in (tmp_path / "benchmarks.md").read_text()
