"""Names, addresses and parsing of a testbed plan (no root needed)."""

from __future__ import annotations

import ipaddress

import pytest

from rain.model.errors import InvalidRequest
from rain.model.units import format_bits_per_second
from rain.testbed.iproute import Batch
from rain.testbed.plan import (
    MAX_NODES,
    SPACE,
    Shaping,
    check_link_delay,
    check_link_rate,
    check_name,
    fair_buckets,
    make_plan,
    node_names,
)


@pytest.mark.parametrize(("text", "bits"), [
    ("50mbit", 50_000_000), ("1gbit", 1_000_000_000), ("800kbit", 800_000),
    ("1.5gbit", 1_500_000_000), ("2500000", 2_500_000), ("10Mbit", 10_000_000),
    ("1mibit", 1 << 20), (" 100mbit ", 100_000_000), (64_000, 64_000),
])
def test_rates_parse_like_tc(text: str | int, bits: int) -> None:
    assert check_link_rate(text) == bits


@pytest.mark.parametrize("text", ["", "fast", "50mbps", "50 mb", "-5mbit", "1kbit",
                                  "200gbit", "mbit", "5mbit/s"])
def test_bad_rates_are_one_line_errors(text: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_link_rate(text)
    assert "\n" not in str(info.value) and "rate" in str(info.value)


def test_rates_format_back() -> None:
    assert format_bits_per_second(50_000_000) == "50mbit"
    assert format_bits_per_second(1_000_000_000) == "1gbit"
    assert format_bits_per_second(800_000) == "800kbit"
    assert check_link_rate(format_bits_per_second(1_500_000_000)) == 1_500_000_000


def test_delays() -> None:
    assert check_link_delay("5ms") == pytest.approx(0.005)
    assert check_link_delay("200us") == pytest.approx(0.0002)
    assert check_link_delay("0.1s") == pytest.approx(0.1)
    for bad in ("5", "fast", "0ms", "20s"):
        with pytest.raises(InvalidRequest):
            check_link_delay(bad)


@pytest.mark.parametrize("name", ["", "Tb", "1tb", "tb-2", "tb_2", "abcdefghijk", "a b"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidRequest):
        check_name(name)


def test_node_names_are_zero_padded() -> None:
    assert node_names(3) == ["n01", "n02", "n03"]
    assert node_names(24)[-1] == "n24"
    assert node_names(100)[:2] == ["n001", "n002"]


def test_addresses_are_unique_inside_the_space_and_names_fit() -> None:
    plan = make_plan("abcdefghij", MAX_NODES, 7)
    addresses = [ipaddress.IPv4Address(h.address) for h in plan.hosts]
    addresses.append(ipaddress.IPv4Address(plan.host_address))
    assert len(set(addresses)) == len(addresses)
    assert all(a in plan.network and a in SPACE for a in addresses)
    assert plan.nodes[250].address.endswith(".1")  # spread over the third octet
    assert plan.nodes[249].address.split(".")[2] != plan.nodes[250].address.split(".")[2]
    for host in plan.hosts:
        for dev in (host.port, host.upload_dev, host.download_dev, host.link_bridge):
            assert len(dev) <= 15
    assert len(plan.host_link) <= 15


def test_slot_zero_puts_the_repository_at_198_18_0_1() -> None:
    plan = make_plan("tb", 3, 0)
    assert plan.url == "http://198.18.0.1:8480"
    assert [n.address for n in plan.nodes] == ["198.18.1.1", "198.18.1.2", "198.18.1.3"]
    assert plan.namespaces == ("rain-tb-sw", "rain-tb-repo", "rain-tb-n01", "rain-tb-n02",
                               "rain-tb-n03")
    assert plan.host("n02").namespace == "rain-tb-n02"
    with pytest.raises(InvalidRequest):
        plan.host("n04")


def test_bad_node_counts_and_slots() -> None:
    for nodes in (0, -1, MAX_NODES + 1):
        with pytest.raises(InvalidRequest):
            make_plan("tb", nodes, 0)
    with pytest.raises(InvalidRequest):
        make_plan("tb", 3, 8)


def test_shaping_holds_a_gso_packet_and_4ms() -> None:
    low, high = Shaping.for_rate(10_000_000), Shaping.for_rate(1_000_000_000)
    assert low.burst == 64 * 1024
    assert high.burst == 1_000_000_000 // 8 // 250
    assert high.limit == high.burst + 1_000_000_000 // 8 // 40


def test_fair_buckets_separate_the_nodes() -> None:
    assert fair_buckets(1) == 2
    assert fair_buckets(3) == 4
    assert fair_buckets(24) == 32
    assert fair_buckets(1000) == 64


def test_a_delay_puts_netem_at_the_root_and_the_rate_limit_under_it() -> None:
    # This machine's kernel has no sch_netem, so the `--latency` path is checked as the
    # tc commands it would run (netem's documented order for rate plus delay).
    shaping = Shaping.for_rate(25_000_000)
    plain = Batch("ns").shape("eth0", shaping)
    assert plain.tc_lines == [f"qdisc add dev eth0 root handle 1: tbf rate 25000000bit "
                              f"burst {shaping.burst} limit {shaping.limit}"]
    delayed = Batch("ns").shape("eth0", shaping, delay=0.005)
    root, child = delayed.tc_lines
    assert root == "qdisc add dev eth0 root handle 9: netem delay 5000us limit 1000"
    assert child.startswith("qdisc add dev eth0 parent 9:1 handle 1: tbf rate 25000000bit")
    # netem's queue holds twice what is in flight during the delay, at least 1000 packets
    slow = Batch().shape("eth0", Shaping.for_rate(10_000_000_000), delay=0.01)
    assert slow.tc_lines[0].endswith(f"limit {int(10_000_000_000 / 8 * 0.01 / 1500) * 2}")
