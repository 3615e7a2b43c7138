"""`--method auto`: the rule of rain.deploy.auto, branch by branch."""

from __future__ import annotations

from rain.deploy.auto import choose_method


def test_the_rule() -> None:
    none = lambda _n: 0.0  # noqa: E731
    assert choose_method("http", ["a", "b"], none) == ("http", "asked for")
    assert choose_method("auto", [], none)[0] == "cache"
    most = {"a": 0.9, "b": 0.6}
    assert choose_method("auto", ["a", "b"], most.__getitem__)[0] == "chunks"
    some = {"a": 0.9, "b": 0.2}  # one node would move most of the image: not chunks
    assert choose_method("auto", ["a", "b"], some.__getitem__)[0] == "tree"
    assert choose_method("auto", ["a"], none)[0] == "http"
    method, why = choose_method("auto", [f"n{i}" for i in range(24)], none)
    assert method == "tree" and "24 nodes" in why
