"""Budget parsing: every accepted form, every error form, and how budgets are echoed."""

import pytest

from velora_cli.budget import BudgetError, describe_budget, format_bytes, parse_budget


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("10GB", 10 * 10**9),
        ("10GiB", 10 * 2**30),
        ("9.5G", 9_500_000_000),
        ("10240MB", 10_240 * 10**6),
        ("10240MiB", 10 * 2**30),
        ("123456B", 123_456),
        ("1.5TB", 1_500_000_000_000),
        ("2TiB", 2 * 2**40),
        ("512KiB", 512 * 1024),
        ("64KB", 64_000),
        ("3K", 3_000),
        ("700M", 700_000_000),
        ("1T", 10**12),
        ("10gb", 10 * 10**9),
        ("10gib", 10 * 2**30),
        ("10 GB", 10 * 10**9),
        ("  10 GiB  ", 10 * 2**30),
        (".5GiB", 2**29),
        ("1e3MB", 10**9),
        ("1e-9GB", 1),  # exactly one byte (the tune refuses budgets under 1 MB)
        ("9223372036854775807B", 2**63 - 1),  # the largest: int64 bytes
    ],
)
def test_accepted_forms(text, nbytes):
    assert parse_budget(text) == nbytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", "has no unit"),
        ("10.5", "has no unit"),
        ("0GB", "is zero"),
        ("0", "is zero"),  # not "write e.g. 0GB", which is zero too
        ("-5GB", "is negative"),
        ("-5", "is negative"),
        ("nan", "cannot read"),
        ("nanGB", "cannot read"),
        ("inf GB", "cannot read"),
        ("infinity", "cannot read"),
        ("", "cannot read"),
        ("   ", "cannot read"),
        ("GB", "cannot read"),
        ("ten GB", "cannot read"),
        ("1.2.3GB", "cannot read"),
        ("10 XB", "unknown unit"),
        ("10 gigabytes", "unknown unit"),
        ("10GB 2GB", "cannot read"),
        ("0.1B", "less than one byte"),
        ("1.5B", "not a whole number of bytes"),  # never rounded silently
        ("1e-10GB", "less than one byte"),
        ("1e400GB", "more than 8 EiB"),  # was an OverflowError
        ("9223372036854775808B", "more than 8 EiB"),
    ],
)
def test_error_forms(text, message):
    with pytest.raises(BudgetError, match=message) as info:
        parse_budget(text)
    text_of_error = str(info.value)
    assert "\n" not in text_of_error  # one line, names what is accepted
    assert "10GB" in text_of_error and "10GiB" in text_of_error


def test_budget_error_is_a_value_error_and_rejects_non_text():
    assert issubclass(BudgetError, ValueError)
    with pytest.raises(BudgetError, match="must be text"):
        parse_budget(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "echo"),
    [
        ("10GB", "10 GB = 9.31 GiB"),
        ("10gib", "10 GiB = 10.00 GiB"),
        ("9.5G", "9.5 GB = 8.85 GiB"),
        ("10240MB", "10240 MB = 9.54 GiB"),
        ("1.5 tb", "1.5 TB = 1396.98 GiB"),
        ("1e3MB", "1000 MB = 0.93 GiB"),
        ("123456B", "123456 B = 120.56 KiB"),  # under 0.01 GiB: never "0.00 GiB"
    ],
)
def test_describe_budget_echoes_the_interpretation(text, echo):
    assert describe_budget(parse_budget(text), text) == echo


def test_describe_budget_without_text_uses_the_byte_count():
    assert describe_budget(10**10) == "10000000000 B = 9.31 GiB"


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (100, "100 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.50 KiB"),
        (512 * 2**20, "512 MiB"),
        (10**10, "9.31 GiB"),
        (3 * 2**40, "3 TiB"),
        (-1536, "-1.50 KiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.3GiB", 1395864371),  # 1.3 × 2^30 = 1395864371.2 B: rounded down (issue 28)
        ("0.1KiB", 102),  # 102.4 B
        ("1.0000000001GiB", 2**30),  # 2^30 + 0.107 B
    ],
)
def test_fraction_of_a_byte_in_a_larger_unit_is_rounded_down(text, expected):
    assert parse_budget(text) == expected
