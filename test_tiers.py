"""The two tiers (conftest.py): `pytest` runs the fast tier and leaves out the tests marked slow, saying how many;
`pytest --slow` runs them all; `-m` picks by the marker itself. Run here on a two-test file, with this conftest."""

import pytest

TWO_TESTS = """
import pytest


@pytest.mark.slow
def test_slow():
    pass


def test_fast():
    pass
"""


@pytest.fixture
def two_tests(pytester):
    pytester.makepyfile(test_two=TWO_TESTS)

    def run(*flags):
        return pytester.runpytest_inprocess("-p", "conftest", "-p", "no:cacheprovider", *flags)

    return run


def test_the_fast_tier_leaves_out_the_slow_tests_and_says_how_to_run_them(two_tests):
    result = two_tests()
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["fast tier: 1 slow tests not run; `python -m pytest -q --slow` runs all"])


def test_slow_runs_every_test(two_tests):
    result = two_tests("--slow")
    result.assert_outcomes(passed=2)
    assert "fast tier" not in result.stdout.str()


@pytest.mark.parametrize("expression, passed", [("slow", 1), ("not slow", 1)])
def test_a_marker_expression_picks_by_the_marker_alone(two_tests, expression, passed):
    two_tests("-m", expression).assert_outcomes(passed=passed, deselected=1)
