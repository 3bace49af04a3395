import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtrain.quant import pack, packed_numel, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_round_trip_any_length(bits, data):
    codes = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=300))
    tensor = torch.tensor(codes, dtype=torch.int64)
    packed = pack(tensor, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(len(codes), bits)
    assert torch.equal(unpack(packed, bits, len(codes)), tensor)


@pytest.mark.parametrize("bits,bytes_for_8", [(2, 2), (3, 3), (4, 4), (8, 8)])
def test_packing_takes_exactly_bits_per_code(bits, bytes_for_8):
    assert packed_numel(8, bits) == bytes_for_8
    assert packed_numel(1024, bits) == 1024 * bits // 8


def test_three_bit_codes_are_not_nibbles():
    assert packed_numel(1024, 3) < packed_numel(1024, 4)


def test_bad_width_is_rejected():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.int64), 9)
