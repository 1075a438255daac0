"""tools/mutation_check.py breaks key lines of the engine and expects the suite to fail. It finds each line by an
exact fragment, so code that moves or is reworded leaves its mutant stale (checking nothing) until the slow tool
is run again. This keeps every mutant pointed at its line: each fragment occurs exactly once in its file, and the
tests each mutant runs exist."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation_check)


def test_every_mutant_finds_its_line_once_and_its_tests():
    stale = [m.name for m in mutation_check.MUTANTS if (ROOT / m.file).read_text().count(m.old) != 1]
    assert stale == [], f"mutants whose fragment is not exactly once in their file: {stale}"
    unchanged = [m.name for m in mutation_check.MUTANTS if m.old == m.new]
    assert unchanged == []
    files = {t for m in mutation_check.MUTANTS for t in m.tests if t.startswith("tests/")}
    assert files and all((ROOT / t).is_file() for t in files), sorted(t for t in files if not (ROOT / t).is_file())
    assert len(mutation_check.MUTANTS) >= 109
