"""Types in the IR: `TypeRef`, built from Python annotations, and the rule
that decides whether a value of one type can reach a parameter of another.

A TypeRef is plain data (a qualified class name, type arguments and the
class's base names), so a Graph decoded from JSON can be type-checked without
importing the classes it mentions. This module must not import torch, numpy
or ray: it learns about their classes only from annotations it is given.
"""

from __future__ import annotations

import abc
import inspect
import types
import typing
from typing import Any

import msgspec


class TypeRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A type as the IR records it.

    `name` is the qualified class name ("builtins.int", "torch.Tensor") or a
    typing form ("typing.Any", "typing.Union"). `args` are type arguments
    (`list[int]` has one). `bases` lists the qualified names of the class's
    superclasses (its MRO without itself and `object`), so subclass checks
    need no import. `abstract` marks ABCs and protocols, whose virtual
    subclasses cannot be known from data.
    """

    name: str
    args: tuple[TypeRef, ...] = ()
    bases: tuple[str, ...] = ()
    abstract: bool = False


ANY = TypeRef(name="typing.Any")
NONE = TypeRef(name="builtins.NoneType")
ELLIPSIS = TypeRef(name="builtins.ellipsis")
_UNION = "typing.Union"

# PEP 484's numeric tower: an int is acceptable where a float is expected.
_PROMOTIONS = {
    "builtins.int": ("builtins.float", "builtins.complex"),
    "builtins.bool": ("builtins.float", "builtins.complex"),
    "builtins.float": ("builtins.complex",),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_ref(cls: type, args: tuple[TypeRef, ...] = ()) -> TypeRef:
    if cls is object:
        return TypeRef(name="builtins.object")
    bases = tuple(_qualname(b) for b in cls.__mro__[1:] if b is not object)
    abstract = isinstance(cls, abc.ABCMeta) or bool(getattr(cls, "_is_protocol", False))
    return TypeRef(name=_qualname(cls), args=args, bases=bases, abstract=abstract)


def from_annotation(annotation: object) -> TypeRef:
    """Translate a resolved annotation into a TypeRef (unknown forms: Any)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return ANY
    if annotation is None or annotation is type(None):
        return NONE
    if annotation is Ellipsis:
        return ELLIPSIS
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return from_annotation(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        members = tuple(from_annotation(a) for a in typing.get_args(annotation))
        return ANY if ANY in members else TypeRef(name=_UNION, args=members)
    if origin is not None and isinstance(origin, type):
        args = tuple(from_annotation(a) for a in typing.get_args(annotation))
        return _class_ref(origin, args)
    if isinstance(annotation, type):
        return _class_ref(annotation)
    # TypeVars, Literal, Callable[...] forms, unresolved strings: unknown.
    return ANY


def _related(src: TypeRef, dst: TypeRef) -> bool:
    return (
        src.name == dst.name
        or dst.name in src.bases
        or src.name in dst.bases
        or dst.name in _PROMOTIONS.get(src.name, ())
    )


def can_match(src: TypeRef, dst: TypeRef) -> bool:
    """True unless a value of type `src` certainly cannot be a `dst`.

    The check is deliberately permissive: Any, abstract classes and protocols
    match everything, and a subclass relation in either direction matches
    (a `Sequence` may well be a `list` at run time). Only two concrete,
    unrelated classes, or generic arguments that are, are a mismatch.
    """
    if src.name == ANY.name or dst.name == ANY.name:
        return True
    if dst.name == _UNION:
        return any(can_match(src, d) for d in dst.args)
    if src.name == _UNION:
        return any(can_match(s, dst) for s in src.args)
    if dst.name == "builtins.object" or dst.abstract or src.abstract:
        return True
    if not _related(src, dst):
        return False
    if src.name == dst.name and len(src.args) == len(dst.args) and ELLIPSIS not in src.args + dst.args:
        return all(can_match(s, d) for s, d in zip(src.args, dst.args))
    return True


def render(t: TypeRef) -> str:
    """The short, readable spelling of a type used by dumps and errors."""
    if t.name == _UNION:
        return " | ".join(render(a) for a in t.args)
    if t == ELLIPSIS:
        return "..."
    short = {"typing.Any": "Any", "builtins.NoneType": "None"}.get(t.name, t.name.rsplit(".", 1)[-1])
    if t.args:
        return f"{short}[{', '.join(render(a) for a in t.args)}]"
    return short


def item_type(container: TypeRef, key: int | str) -> TypeRef:
    """The type of `container[key]`, where the container's type says it."""
    name, args = container.name, container.args
    if name == "builtins.tuple" and args:
        if len(args) == 2 and args[1] == ELLIPSIS:
            return args[0]
        if isinstance(key, int) and -len(args) <= key < len(args):
            return args[key]
        return ANY
    if name in ("builtins.list", "collections.abc.Sequence", "typing.Sequence") and len(args) == 1:
        return args[0] if isinstance(key, int) else ANY
    if name in ("builtins.dict", "collections.abc.Mapping") and len(args) == 2:
        return args[1]
    return ANY


def join(types_: tuple[TypeRef, ...]) -> TypeRef:
    """The type of a value that is one of `types_` (a switch's result)."""
    unique: list[TypeRef] = []
    for t in types_:
        if t.name == ANY.name:
            return ANY
        if t not in unique:
            unique.append(t)
    if len(unique) == 1:
        return unique[0]
    return TypeRef(name=_UNION, args=tuple(unique)) if unique else ANY
