"""The generated pages are current, and the README stays a page a user reads in three minutes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import cli_reference  # noqa: E402
import run_all  # noqa: E402


def test_the_command_reference_is_generated_from_the_command_line():
    text = cli_reference.reference()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: python scripts/cli_reference.py"
    for command in ("index", "search", "serve", "train", "bench retrieval", "bench compare"):
        assert f"## `clipengine {command}`" in text
    assert "| `--memory-budget <str>` |" in text and "| `--lr <float>` |" in text  # options, train's from TrainConfig


def test_the_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    stale = tmp_path / "cli.md"
    stale.write_text("# Command reference\n")
    monkeypatch.setattr(cli_reference, "PAGE", stale)
    monkeypatch.setattr(sys, "argv", ["cli_reference.py", "--check"])
    try:
        cli_reference.main()
    except SystemExit as e:
        assert "stale" in str(e.code)
    else:
        raise AssertionError("a stale page passed the check")


def test_the_performance_page_is_generated_from_the_result_files(tmp_path):
    assert (ROOT / "docs" / "performance.md").read_text() == run_all.performance_page(), \
        "docs/performance.md is stale: python benchmarks/run_all.py --page"
    newest = run_all.latest_results()
    assert set(newest) == set(run_all.BENCHMARKS)  # every benchmark has a result on the page
    # the newest full run of a benchmark wins; other names that start alike are not its results
    for name in ("search-2026-01-01.json", "search-2027-01-01.json", "search-quick.json", "train-scenes-2027-01-01.json"):
        (tmp_path / name).write_text((ROOT / "benchmarks" / "results" / "search-2026-11-22.json").read_text())
    found = run_all.latest_results(tmp_path)
    assert {k: v[0] for k, v in found.items()} == {"search": "2027-01-01"}


def test_the_readme_is_a_short_page_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme  # the two set-up commands
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"


def test_ci_runs_the_readmes_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).returncode == 0
