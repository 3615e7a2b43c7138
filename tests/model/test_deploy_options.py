"""DeployOptions: the one typed form of a deployment's options (rain.model.deploy)."""

from __future__ import annotations

from typing import Any

import pytest

from rain.model.deploy import DEFAULT_STALL_SECONDS, DeployOptions
from rain.model.errors import InvalidRequest

EVERY = {"size": 20 << 30, "ephemeral_size": 1 << 30, "copy": True, "fanout": 3,
         "stripes": 2, "stripe_unit": 8, "encrypt": True, "web_seed": "always",
         "rate": 12.5e6, "max_rate": 25e6, "stall_seconds": 12.0, "max_holders": 0,
         "owner_wait_seconds": 7.5}


def test_every_option_survives_json_both_ways() -> None:
    opts = DeployOptions.from_json(EVERY)
    assert opts.size_bytes == 20 << 30 and opts.max_rate_bytes_per_s == 25e6
    assert opts.max_holders == 0 and opts.owner_wait_seconds == 7.5
    assert opts.to_json() == EVERY
    assert DeployOptions.from_json(opts.to_json()) == opts


def test_only_what_was_set_goes_on_the_wire() -> None:
    assert DeployOptions().to_json() == {}
    assert DeployOptions.from_json(None) == DeployOptions.from_json({}) == DeployOptions()
    assert DeployOptions.from_json({"size": "20G"}).to_json() == {"size": 20 << 30}


def test_the_stall_limit_has_one_default() -> None:
    assert DeployOptions().stall_timeout_seconds == DEFAULT_STALL_SECONDS
    assert DeployOptions(stall_seconds=2).stall_timeout_seconds == 2


@pytest.mark.parametrize(("given", "message"), [
    ({"colour": "red", "max_holder": 1}, "unknown options: colour, max_holder (known: "),
    ({"max_holders": 65}, "option max_holders must be a whole number from 0 to 64, not 65"),
    ({"max_holders": -1}, "option max_holders must be a whole number from 0 to 64, not -1"),
    ({"max_holders": 2.5}, "option max_holders must be a whole number from 0 to 64, not 2.5"),
    ({"max_holders": True}, "option max_holders must be a whole number"),
    ({"owner_wait_seconds": 0}, "option owner_wait_seconds must be a number above 0 and at "
                                "most 3600, not 0"),
    ({"owner_wait_seconds": 1e9}, "option owner_wait_seconds must be a number above 0"),
    ({"owner_wait_seconds": "15"}, "option owner_wait_seconds must be a number above 0"),
    ({"stall_seconds": float("nan")}, "option stall_seconds must be a number above 0"),
    ({"stall_seconds": -3}, "option stall_seconds must be a number above 0"),
    ({"fanout": 0}, "option fanout must be a whole number from 1 to 64, not 0"),
    ({"stripe_unit": 65}, "option stripe_unit must be a whole number from 1 to 64"),
    ({"copy": "yes"}, "option copy must be true or false, not 'yes'"),
    ({"web_seed": "sometimes"}, "option web_seed must be one of never, stall, always"),
    ({"max_rate": 0}, "option max_rate must be a number above 0, not 0"),
    ({"size": "lots"}, "bad size 'lots'"),
    ({"size": -5}, "option size must be a whole number of at least 0, not -5"),
    (["size"], "options must be an object"),
])
def test_bad_options_are_one_line(given: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        DeployOptions.from_json(given)
    assert caught.value.message.startswith(message)
    assert "\n" not in caught.value.message


def test_typed_construction_is_checked_too() -> None:
    with pytest.raises(InvalidRequest, match="max_holders"):
        DeployOptions(max_holders=100)
