"""The README a newcomer reads: short, its two commands on the first screen, the test command the one CI
runs, and every documentation page reachable from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[3]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)


def test_the_readme_is_short_and_opens_with_its_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 200, len(lines)
    first_screen = "\n".join(lines[:40])
    demo, tests = _commands()[:2]
    assert demo in first_screen and tests in first_screen
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("dpa demo")
    assert "python -m pytest" in tests and tests.startswith(".ci/install-web")


def test_ci_runs_the_readmes_test_command_verbatim():
    tests = _commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command and .ci/run's must be the same line"


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    links = set(re.findall(r"\]\(([^)#]+)\)", README))
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    assert pages <= links, sorted(pages - links)
    assert "BENCHMARKS.md" in links


def test_the_readmes_tables_fit_80_columns():
    wide = [line for line in README.splitlines() if line.startswith("|") and len(line) > 80]
    assert not wide, wide
