"""Context-parallel MoBA on 4 gloo ranks (shorter shards, more boundaries) and on 3 (a group that
is not a power of two): `cp_workers.SUITES["four"]` and `["three"]`, each spawned once (`cp_spawn`)."""

from __future__ import annotations

import pytest

import cp_spawn


@pytest.fixture(scope="module")
def four_ranks():
    return cp_spawn.run_suite(4, "four")


@pytest.fixture(scope="module")
def three_ranks():
    return cp_spawn.run_suite(3, "three")


@pytest.mark.parametrize("case", cp_spawn.case_names("four"))
def test_on_four_gloo_ranks(four_ranks, case):
    cp_spawn.check_case(four_ranks, case, 4)


@pytest.mark.parametrize("case", cp_spawn.case_names("three"))
def test_on_three_gloo_ranks(three_ranks, case):
    """A group that is not a power of two (the recurrences' all-gather path)."""
    cp_spawn.check_case(three_ranks, case, 3)
