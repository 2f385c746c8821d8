"""Context-parallel MoBA on 2 gloo ranks: `cp_workers.SUITES["two"]`, spawned once (`cp_spawn`);
each case compares a rank's shard of the sharded computation with the single-process answer (the
`reference` backend on the whole sequence, or the unsharded model)."""

from __future__ import annotations

import pytest

import cp_spawn


@pytest.fixture(scope="module")
def two_ranks():
    return cp_spawn.run_suite(2, "two")


@pytest.mark.parametrize("case", cp_spawn.case_names("two"))
def test_on_two_gloo_ranks(two_ranks, case):
    cp_spawn.check_case(two_ranks, case, 2)
