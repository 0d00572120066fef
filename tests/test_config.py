"""Typed configs: parsing --key=value, validation, round trips."""

import dataclasses
from typing import Literal

import pytest

from experiment.config import (
    Config,
    build_config,
    config_help,
    from_dict,
    option,
    to_dict,
    tokenize,
)
from experiment.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Example(Config):
    size: int = option(4, "a size", min=1)
    rate: float = option(0.1, "a rate", gt=0, lt=1)
    flag: bool = option(False, "a flag")
    kind: Literal["a", "b"] = option("a", "a kind")
    sizes: tuple[int, ...] = option((8, 4), "sizes")
    limit: float | None = option(None, "optional limit", gt=0)


def build(*argv):
    return build_config(Example, tokenize(argv))


def test_key_value_forms_and_types():
    cfg = build("--size=3", "--rate", "0.5", "--flag", "--kind=b", "--sizes=16,8,2", "--limit=none")
    assert (cfg.size, cfg.rate, cfg.flag, cfg.kind, cfg.sizes, cfg.limit) == (
        3,
        0.5,
        True,
        "b",
        (16, 8, 2),
        None,
    )
    assert build("--flag=false").flag is False
    assert build("--flag=True").flag is True
    assert build("--size=1e2").size == 100
    assert build("--hidden-size=3".replace("hidden-size", "size")).size == 3


@pytest.mark.parametrize(
    "arg,message",
    [
        ("--size=0", "--size=0: must be >= 1"),
        ("--size=2.5", "expected int"),
        ("--size=abc", "expected int"),
        ("--rate=1", "must be < 1"),
        ("--rate=nan", "finite"),
        ("--kind=c", "choose one of a, b"),
        ("--flag=maybe", "expected bool"),
        ("--sizes=4,x", "expected comma-separated ints"),
        ("--limit=-1", "must be > 0"),
        ("--sise=3", "did you mean --size?"),
        ("--size", "needs a value"),
    ],
)
def test_bad_values_name_the_option_and_what_is_accepted(arg, message):
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace("+", r"\+")):
        build(arg)


def test_positional_and_duplicate_arguments_are_rejected():
    with pytest.raises(UsageError, match="unexpected argument"):
        build("size=3")
    with pytest.raises(UsageError, match="given twice"):
        build("--size=3", "--size=4")


def test_round_trip_through_json_dict():
    cfg = build("--sizes=3,2", "--limit=0.5")
    assert from_dict(Example, to_dict(cfg)) == cfg
    with pytest.raises(UsageError, match="does not know"):
        from_dict(Example, {**to_dict(cfg), "bogus": 1})


def test_help_lists_every_option_with_type_and_default():
    text = config_help(Example)
    for fragment in [
        "--size=int  (default: 4)",
        "--kind={a,b}",
        "--sizes=comma-separated ints  (default: 8,4)",
        "--limit=float or none  (default: None)",
        "--seed=int",
    ]:
        assert fragment in text


def test_an_alias_names_the_same_option(tmp_path):
    from tasks import grad_flow

    cfg = build_config(grad_flow.Config, {"last_target_only": "false"})
    assert cfg.last_step_only is False
    assert build_config(grad_flow.Config, {"last_step_only": "false"}) == cfg
    with pytest.raises(UsageError, match="another name for --last_step_only"):
        build_config(grad_flow.Config, {"last_target_only": "false", "last_step_only": "true"})
