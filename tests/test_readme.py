"""README.md's two set-up commands stay true: CI runs the test command verbatim."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    install_and_train, run_tests = _commands()
    assert "fastvae train" in install_and_train
    assert run_tests.strip() in (ROOT / ".ci" / "run").read_text()
