"""`bench.value_versions` on the tiny Llama: the committed optimisation against the working
tree's, taking turns on the same edits; with no change between them the results agree
exactly, and --append records the command."""

from bench import docs, value_versions
from tests.conftest import ROOT


def test_the_same_code_twice_gives_the_same_values(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(docs, "DOCS", str(tmp_path / "benchmarks.md"))
    before = value_versions.values_at("HEAD")
    assert before.__name__ == "values_HEAD" and callable(before.compute_target_values)
    value_versions.main(["--model", "tiny-llama", "--edits", "2", "--batch-sizes", "2",
                         "--before", "HEAD", "--append"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2 |")]
    assert [r[2].strip() for r in rows] == ["HEAD margin2", "today margin2"]
    written = (tmp_path / "benchmarks.md").read_text()
    assert "python -m bench.value_versions --model tiny-llama" in written
    if "tasks/extract/values.py" not in _changed_files():   # HEAD's code is the tree's
        assert [c.strip() for c in rows[1][6:9]] == ["0.0e+00", "0.0e+00", "yes"]


def _changed_files() -> str:
    import subprocess
    return subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_each_version_takes_its_own_setting(tmp_path, monkeypatch, capsys):
    """--before-variant / --today-variant: the rows name them, and the two settings'
    deltas differ (the same code under one setting gives equal deltas, test above)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(docs, "DOCS", str(tmp_path / "benchmarks.md"))
    value_versions.main(["--model", "tiny-llama", "--edits", "2", "--batch-sizes", "2",
                         "--before", "HEAD", "--before-variant", "nll",
                         "--today-variant", "margin2-bf16"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2 |")]
    assert [r[2].strip() for r in rows] == ["HEAD nll", "today margin2-bf16"]
    assert float(rows[1][6]) > 1e-3
