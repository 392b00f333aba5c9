"""`Namespace`: every identifier the code generator writes comes from here.

Generated code binds step callables, constants and helpers as globals and
node values as locals. Step names are user text ("a b", "a_b", "len",
"v1", two factory-made functions both called "model"): deriving an
identifier from one by sanitizing it alone lets two different steps land
on one global, and the later one silently wins. As in torch.fx's
`_Namespace`, a name is therefore *allocated*: legal, ASCII, never a
keyword or builtin, never one already handed out, and the same object
(`key`) always gets the same name back.
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Hashable, Iterable

# Identifiers stay ASCII: Python NFKC-normalizes non-ASCII identifiers,
# so two different spellings ("ﬁ", "fi") could name one variable.
_ILLEGAL = re.compile(r"[^0-9A-Za-z_]")
_ALWAYS_TAKEN = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


class Namespace:
    """Allocates unique, legal identifiers for one generated module."""

    def __init__(self) -> None:
        self._taken: set[str] = set(_ALWAYS_TAKEN)
        self._names: dict[Hashable, str] = {}
        self._suffix: dict[str, int] = {}

    def reserve(self, name: str) -> str:
        """Claim `name` exactly (helpers the runtime defines, e.g. `_get`).
        Reserve before allocating anything else: a name already handed out
        cannot be reserved."""
        if name in self._taken or not name.isidentifier() or not name.isascii():
            raise ValueError(f"generated code cannot reserve the name {name!r}: it is taken or not a plain identifier")
        self._taken.add(name)
        return name

    def name(self, key: Hashable, candidate: str) -> str:
        """The identifier of `key`: allocated from `candidate` on first
        request, the same string on every later one."""
        found = self._names.get(key)
        if found is not None:
            return found
        base = _ILLEGAL.sub("_", candidate) or "_"
        if base[0].isdigit():
            base = f"_{base}"
        name = base
        while name in self._taken:
            n = self._suffix.get(base, 0) + 1
            self._suffix[base] = n
            name = f"{base}_{n}"
        self._taken.add(name)
        self._names[key] = name
        return name

    def names(self, items: Iterable[tuple[Hashable, str]]) -> list[str]:
        """`name` for each (key, candidate), in order."""
        return [self.name(k, c) for k, c in items]
