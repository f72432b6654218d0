"""CI entry of the mutation check (tests/mutation_check.py): every planted bug must be caught by its test subset.

Runs the unmutated copy once, then each mutant in its own temporary copy (several minutes on 2 cores: marked slow).
CI: ``python -m pytest tests/test_mutation.py -q`` (or ``python tests/mutation_check.py``).
"""
import pytest

import mutation_check


def test_mutation_table_patterns_match_the_code():
    # cheap and always on: a refactor that moves a planted line fails here, naming the row to retarget
    for m in mutation_check.MUTANTS:
        mutation_check.target(mutation_check.ROOT, m)  # raises, naming the row to retarget
        assert m.tests and all(t.startswith("tests/") for t in m.tests)


@pytest.mark.slow
def test_every_planted_bug_is_caught():
    results = mutation_check.check(verbose=True)
    bad = {k: v for k, v in results.items() if v != "caught"}
    assert not bad, "planted bugs the tests did not catch:\n" + "\n".join(f"{k}: {v}" for k, v in bad.items())
