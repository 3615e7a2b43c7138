"""`[schedule]` multipliers and the spread / pack policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from rain.config import load_config
from rain.model import InvalidRequest, Placement
from rain.schedule import (
    PlacementRequest,
    Policy,
    ScheduleConfig,
    SiblingsWeigher,
    describe,
    parse_policy,
    place,
    policy_name,
    total_weights,
    weighers_for,
    with_policy,
)
from rain.schedule.policy import check_config
from tests.schedule.conftest import node


def test_siblings_weigher_counts_only_the_requests_own_picks() -> None:
    a, b = node("a", running=5), node("b")
    request = PlacementRequest("img", placed={"b": 2})
    w = SiblingsWeigher(4.0)
    assert (w.weigh(a, request), w.weigh(b, request)) == (0.0, -2.0)
    assert total_weights([a, b], request, [w]) == {"a": 4.0, "b": 0.0}
    # Before the first pick it cannot tell nodes apart and adds nothing.
    assert total_weights([a, b], PlacementRequest("img"), [w]) == {"a": 0.0, "b": 0.0}


def test_policies_sign_the_load_weighers_and_keep_their_size() -> None:
    cfg = ScheduleConfig(instances_weight_multiplier=2.0, siblings_weight_multiplier=5.0)
    packed = with_policy(cfg, Policy.PACK)
    assert (packed.instances_weight_multiplier, packed.siblings_weight_multiplier) == \
        (-2.0, -5.0)
    assert packed.cache_weight_multiplier == cfg.cache_weight_multiplier  # never inverted
    assert with_policy(packed, Policy.SPREAD) == cfg
    assert with_policy(cfg, None) is cfg
    # A weigher switched off in the config still takes part when a policy is asked for.
    off = with_policy(ScheduleConfig(siblings_weight_multiplier=0.0), Policy.PACK)
    assert off.siblings_weight_multiplier == -ScheduleConfig().siblings_weight_multiplier
    assert [policy_name(c) for c in (cfg, packed, ScheduleConfig(
        instances_weight_multiplier=1.0, siblings_weight_multiplier=-1.0),
        ScheduleConfig(instances_weight_multiplier=0.0))] == \
        ["spread", "pack", "custom", "spread"]


def test_describe_says_which_policy_placed() -> None:
    d = describe(ScheduleConfig(), Policy.PACK)
    assert d["policy"] == "pack" and d["asked"] == "pack" and d["default"] == "spread"
    assert d["multipliers"]["siblings"] == -4.0 and d["multipliers"]["cache"] == 3.0
    assert describe(ScheduleConfig(), None)["asked"] is None


def test_bad_policies_and_settings_are_one_line_errors() -> None:
    assert parse_policy(None) is None and parse_policy("pack") is Policy.PACK
    with pytest.raises(InvalidRequest, match="unknown placement policy 'stack'"):
        parse_policy("stack")
    with pytest.raises(InvalidRequest, match="in_flight_credit must be between 0 and 1"):
        check_config(ScheduleConfig(in_flight_credit=2.0))
    with pytest.raises(InvalidRequest, match="cache_weight_multiplier must be a number"):
        check_config(ScheduleConfig(cache_weight_multiplier="lots"))  # type: ignore[arg-type]


def test_multipliers_come_from_rain_toml_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "rain.toml").write_text(
        "[schedule]\ninstances_weight_multiplier = -1.0\nsiblings_weight_multiplier = -4.0\n")
    cfg = load_config(tmp_path, env={})
    assert policy_name(cfg.schedule) == "pack"
    nodes = [node("n01"), node("n02")]
    assert place("img", 2, nodes, weighers_for(cfg.schedule)) == [Placement("n01", 2)]
    # An explicit policy still wins over the file.
    assert len(place("img", 2, nodes, weighers_for(cfg.schedule, Policy.SPREAD))) == 2
    env = {"RAIN_SCHEDULE__SIBLINGS_WEIGHT_MULTIPLIER": "6",
           "RAIN_SCHEDULE__INSTANCES_WEIGHT_MULTIPLIER": "1"}
    assert load_config(tmp_path, env=env).schedule.siblings_weight_multiplier == 6.0
    (tmp_path / "rain.toml").write_text("[schedule]\nspread = true\n")
    with pytest.raises(InvalidRequest, match="unknown setting 'spread'"):
        load_config(tmp_path, env={})


def test_a_setting_that_is_not_a_number_is_a_one_line_error(tmp_path: Path) -> None:
    env = {"RAIN_SCHEDULE__CACHE_WEIGHT_MULTIPLIER": "lots"}
    with pytest.raises(InvalidRequest, match="cache_weight_multiplier must be a number"):
        load_config(tmp_path, env=env)
