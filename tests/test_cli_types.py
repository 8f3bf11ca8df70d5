"""The argparse validators: finite numbers of the right sign, or a one-line usage error."""

from __future__ import annotations

import argparse

import pytest

from leanserve import cli_types


@pytest.mark.parametrize(("validator", "good", "bad"), [
    (cli_types.finite_float, ["-1.5", "0", "1e3"], ["nan", "inf", "-inf", "x", ""]),
    (cli_types.positive_float, ["0.001", "2", "1e9"], ["0", "-1", "nan", "inf", "-0.0"]),
    (cli_types.non_negative_float, ["0", "2.5"], ["-0.1", "nan", "inf"]),
    (cli_types.fraction, ["0.01", "1"], ["0", "1.01", "-0.5", "nan"]),
    (cli_types.unit_interval, ["0", "0.5", "1"], ["1.01", "-0.1", "nan", "inf"]),
    (cli_types.positive_int, ["1", "64"], ["0", "-3", "1.5", "x"]),
    (cli_types.port, ["0", "8000", "65535"], ["-1", "65536", "http"]),
])
def test_validators_accept_and_refuse(validator, good: list[str], bad: list[str]) -> None:
    for text in good:
        assert validator(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            validator(text)


def test_a_refusal_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--price", type=cli_types.positive_float)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--price", "nan"])
    assert exit_info.value.code == 2
    assert "argument --price: must be a finite number, got 'nan'" in capsys.readouterr().err
