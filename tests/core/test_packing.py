import pytest
import torch

from lowbit.core.packing import pack_codes, packed_row_bytes, unpack_codes
from lowbit.errors import ConfigError


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("width", [1, 7, 8, 13, 576])
def test_round_trip_every_bit_width(bits: int, width: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + width)
    codes = torch.randint(0, 1 << bits, (5, width), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, packed_row_bytes(width, bits))
    assert torch.equal(unpack_codes(packed, bits, width), codes)


def test_golden_bytes_4bit_low_nibble_first() -> None:
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x7]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F, 0x07]]


def test_golden_bytes_3bit_stream() -> None:
    # codes 5 (101), 3 (011), 6 (110): stream bits LSB first = 1,0,1, 1,1,0, 0,1,1 → byte0 = 0b10011101, byte1 = 0b1
    codes = torch.tensor([[5, 3, 6]], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [[0b10011101, 0b1]]


def test_golden_bytes_2bit_and_6bit() -> None:
    assert pack_codes(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11]]
    # 6-bit: 63 then 1 → bits 111111 100000 → byte0 = 0b01111111, byte1 = 0b0000
    assert pack_codes(torch.tensor([[63, 1]], dtype=torch.uint8), 6).tolist() == [[0b01111111, 0b0000]]


def test_code_too_large_is_rejected() -> None:
    with pytest.raises(ConfigError):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)


def test_wrong_packed_width_is_rejected() -> None:
    with pytest.raises(ConfigError):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 7)
