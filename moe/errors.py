"""The ground floor: validation helpers every room may import (it imports nothing of floe).

ConfigError is the one exception type for bad user input; the checks here return lists of messages
so that a launch can report every problem at once."""
from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """Bad input (a config key, a data file, a launch that contradicts the config), found before
    any collective: launch/train.py prints its message once and exits with code 2."""


def field_type_errors(obj, section: str) -> list[str]:
    """Check every field of dataclass `obj` against its annotation (int, float, bool, str, lists of
    those, `| None`); ints are accepted (and stored as floats) for float fields. One message per bad
    key, e.g. "optim.lr must be a number, got 'abc'". Called first by each config's __post_init__,
    so the range checks after it compare numbers with numbers."""
    import types
    import typing

    def ok(value, tp) -> tuple[bool, object]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            for arg in args:
                good, converted = ok(value, arg)
                if good:
                    return True, converted
            return False, value
        if tp is type(None):
            return value is None, value
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                return False, value
            items = [ok(v, args[0]) for v in value] if args else [(True, v) for v in value]
            return all(g for g, _ in items), origin(c for _, c in items)
        if tp is bool:
            return isinstance(value, bool), value
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool), value
        if tp is float:
            good = isinstance(value, (int, float)) and not isinstance(value, bool)
            return good, float(value) if good else value
        if tp is str:
            return isinstance(value, str), value
        return True, value

    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

    def describe(tp) -> str:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            return " or ".join("null" if a is type(None) else describe(a) for a in args)
        if origin in (list, tuple):
            return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
        return names.get(tp, getattr(tp, "__name__", str(tp)))

    errors = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        good, converted = ok(value, hints[f.name])
        if good:
            object.__setattr__(obj, f.name, converted)
        else:
            errors.append(f"{section}.{f.name} must be {describe(hints[f.name])}, got {value!r}")
    return errors


def batch_errors(global_batch_size, micro_batch_size, dp_size: int) -> list[str]:
    """The batch-split rules (the one place they live): positive sizes, and a global batch
    that every data-parallel rank splits into the same number of micro-batches."""
    problems = []
    if not isinstance(global_batch_size, int) or isinstance(global_batch_size, bool) or global_batch_size < 1:
        problems.append(f"train.global_batch_size must be a positive integer, got {global_batch_size!r}")
    if not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1:
        problems.append(f"train.micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    if not problems and global_batch_size % (micro_batch_size * dp_size):
        problems.append(
            f"train.global_batch_size ({global_batch_size}) must be divisible by train.micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp_size}) = {micro_batch_size * dp_size}, so every "
            "rank runs the same number of micro-batches")
    return problems
