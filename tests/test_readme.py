"""The README's set-up commands are the ones CI runs: .ci/run calls the test command verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines[:12] if line.startswith("    ")]


def test_readme_opens_with_a_run_and_a_test_command():
    run, test = readme_commands()[:2]
    assert 'threed run --prompt "a yellow rubber duck"' in run
    assert "pytest" in test and "pip install" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()
