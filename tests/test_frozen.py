"""quick_init: the same constructor as the dataclass's own (arguments, defaults, factories, keyword-only),
still frozen; refused where it cannot keep that promise."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from ztmw._frozen import positional_factory, quick_init
from ztmw.models import AuditEvent, RequestView, VerifiedToken


def _both() -> tuple[type[Any], type[Any]]:
    """One class with the dataclass's own __init__ and its twin with quick_init's."""

    def body() -> dict[str, Any]:
        return {"__annotations__": {"a": "int", "b": "str", "c": "list[int]", "d": "int"},
                "b": "x", "c": dataclasses.field(default_factory=list), "d": dataclasses.field(default=4, kw_only=True)}

    plain = dataclasses.dataclass(frozen=True, slots=True)(type("Plain", (), body()))
    quick = quick_init(dataclasses.dataclass(frozen=True, slots=True)(type("Quick", (), body())))
    return plain, quick


@pytest.mark.parametrize("args, kwargs", [((1,), {}), ((1, "y"), {}), ((1, "y", [2]), {"d": 5}),
                                          ((), {"a": 1, "c": [3]}), ((1,), {"d": 0})])
def test_it_builds_what_the_dataclass_init_builds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    plain, quick = _both()
    assert dataclasses.astuple(quick(*args, **kwargs)) == dataclasses.astuple(plain(*args, **kwargs))


@pytest.mark.parametrize("args, kwargs", [((), {}), ((1, "y", [2], 5), {}), ((1,), {"e": 1}),
                                          ((1,), {"a": 2})])
def test_it_refuses_the_calls_the_dataclass_init_refuses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    plain, quick = _both()
    for cls in (plain, quick):
        with pytest.raises(TypeError):
            cls(*args, **kwargs)


def test_a_default_factory_gives_each_instance_its_own_value() -> None:
    _, quick = _both()
    first, second = quick(1), quick(2)
    assert first.c == [] and first.c is not second.c


def test_instances_stay_frozen_and_replace_works() -> None:
    event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.status = 500  # type: ignore[misc]
    assert dataclasses.replace(event, status=404).status == 404 and event.status == 200


def test_the_models_keep_their_signatures() -> None:
    view = RequestView(method="GET", path="/", route=None)
    assert view.match_info == {} and view.authorization == () and view.has_body_token is False
    params = inspect.signature(VerifiedToken.__init__).parameters
    assert list(params)[1:7] == ["issuer", "subject", "audience", "expires_at", "token_id", "verifier"]


def test_classes_it_cannot_serve_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithPostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(slots=True)
    class Mutable:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Hidden:
        a: int = dataclasses.field(default=1, init=False)

    for cls in (WithPostInit, Mutable, Hidden):
        with pytest.raises(TypeError):
            quick_init(cls)


# -- positional_factory: VerifiedToken's one hot constructor call ------------------------------------------

def _token_values() -> tuple[Any, ...]:
    return ("iss", "sub", ("aud",), 1.0, "jti", "bearer", "client", frozenset({"a"}), 1.0, 2.0, 3.0, "acr",
            ("pwd",), {"jkt": "x"}, None, {"sub": "sub"}, "kid", 30.0, "thumb")


def test_positional_factory_builds_an_instance_equal_to_the_constructors() -> None:
    make = positional_factory(VerifiedToken)
    made, built = make(*_token_values()), VerifiedToken(*_token_values())
    assert type(made) is VerifiedToken and made == built
    assert dataclasses.astuple(made) == dataclasses.astuple(built) and repr(made) == repr(built)
    assert dataclasses.replace(made, subject="other").subject == "other" and made.subject == "sub"


def test_positional_factory_instances_stay_frozen() -> None:
    made = positional_factory(VerifiedToken)(*_token_values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.subject = "mallory"  # type: ignore[misc]
    twin = positional_factory(VerifiedToken).__globals__["_twin"]  # the mutable same-layout class it fills
    for value in (made, VerifiedToken(*_token_values())):  # not even into the twin: __setattr__ refuses it
        with pytest.raises((dataclasses.FrozenInstanceError, TypeError)):
            value.__class__ = twin
        assert type(value) is VerifiedToken


def test_positional_factory_wants_every_value() -> None:
    make = positional_factory(VerifiedToken)
    with pytest.raises(TypeError):
        make(*_token_values()[:-1])


def test_positional_factory_refuses_classes_it_cannot_serve() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Derived(Base):
        b: int

    for cls in (NoSlots, Derived):
        with pytest.raises(TypeError):
            positional_factory(cls)


def test_a_positional_factory_refuses_a_class_whose_fields_are_not_the_callers() -> None:
    """The caller names the fields it passes; a class changed since is refused where it is made (at import),
    not built with values in the wrong fields."""
    from dataclasses import dataclass

    from ztmw._frozen import positional_factory

    @dataclass(frozen=True, slots=True)
    class Pair:
        left: int
        right: int

    assert positional_factory(Pair, ("left", "right"))(1, 2) == Pair(1, 2)
    with pytest.raises(TypeError, match="update the caller"):
        positional_factory(Pair, ("right", "left"))
