"""Serial numbers: RFC 5280 limits, 96 random bits, and the order that keeps indexes local."""

from __future__ import annotations

import time

import pytest

from ca.errors import InvalidInput
from ca.serial import RANDOM_BITS, Serial


def test_generated_serials_are_in_range_and_written_with_38_hex_digits() -> None:
    for _ in range(1000):
        serial = Serial.generate()
        assert 2**64 <= serial.value < 2**159
        assert serial.value.bit_length() // 8 + 1 <= 20  # DER octets, sign bit included
        assert len(serial.hex) == 38


def test_serials_of_one_millisecond_differ_in_their_random_bits() -> None:
    serials = [Serial.generate() for _ in range(5000)]
    assert len(set(serials)) == len(serials)
    low = {s.value & (2**RANDOM_BITS - 1) for s in serials}
    assert len(low) == len(serials)
    # The random part is not a counter: its top bit is set in about half of them.
    top = sum(s.value >> (RANDOM_BITS - 1) & 1 for s in serials)
    assert 2000 < top < 3000


def test_later_serials_sort_after_earlier_ones_as_numbers_and_as_stored_text() -> None:
    earlier = [Serial.generate() for _ in range(50)]
    time.sleep(0.003)
    later = [Serial.generate() for _ in range(50)]
    assert max(earlier) < min(later)
    assert max(s.hex for s in earlier) < min(s.hex for s in later)


@pytest.mark.parametrize("text", ["", "0", "zz", "1" * 41, "8" + "0" * 39])
def test_parse_refuses_what_is_not_a_serial(text: str) -> None:
    with pytest.raises(InvalidInput):
        Serial.parse(text)


def test_parse_accepts_what_operators_paste() -> None:
    serial = Serial.generate()
    colons = ":".join(serial.hex[i : i + 2] for i in range(0, len(serial.hex), 2))
    assert Serial.parse(colons.upper()) == serial
    assert Serial.parse("0x" + serial.hex) == serial


def test_a_serial_made_for_a_past_time_sorts_before_one_made_now() -> None:
    year_ago = Serial.generate(at=time.time() - 365 * 86400)
    assert len(year_ago.hex) == 38
    assert year_ago < Serial.generate()
