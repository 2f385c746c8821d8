"""MOBA_TRITON_CONFIG parsing: launch-config overrides for tuning the Triton kernels."""

import pytest

from moba_rewrite.kernels.triton import configs as triton_configs


def test_overrides_parse_into_tuples_and_names():
    got = triton_configs._parse(" gate=64,64,4,2 ; fwd=128,32,8,3;fwd_mode=two_pass;gate_prec=tf32x3;"
                                "fwd_piece_mib=256")
    assert got == {"gate": (64, 64, 4, 2), "fwd": (128, 32, 8, 3), "fwd_mode": "two_pass", "gate_prec": "tf32x3",
                   "fwd_piece_mib": 256}
    assert triton_configs._parse("") == {}


@pytest.mark.parametrize("text, expected", [
    ("fwd=1,2,3", "four positive integers"),
    ("bwd=64,64,0,2", "four positive integers"),
    ("gate=a,b,c,d", "four positive integers"),
    ("zzz=1", "expected one of gate, gate_decode, fwd, bwd"),
    ("fwd_mode=fast", "single"),
    ("gate_prec", "expected one of"),
    ("fwd_piece_mib=-1", "whole number"),
    ("fwd_piece_mib=1.5", "whole number"),
])
def test_bad_overrides_name_the_part_and_what_was_expected(text, expected):
    with pytest.raises(ValueError, match="MOBA_TRITON_CONFIG") as info:
        triton_configs._parse(text)
    assert expected in str(info.value)


def test_pick_prefers_an_override(monkeypatch):
    monkeypatch.setitem(triton_configs.OVERRIDES, "fwd", (16, 16, 4, 1))
    assert triton_configs.pick("fwd", (64, 32, 8, 2)) == (16, 16, 4, 1)
    assert triton_configs.pick("bwd", (32, 64, 8, 2)) == (32, 64, 8, 2)
