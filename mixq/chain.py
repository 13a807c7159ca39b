"""`Chain`: what fills a candidate's format, parsed once from its written form "rotate+gptq-act+comq+bias".

A chain is the whole-model transforms applied first (mixq.transforms: "rotate"), one solver that quantizes a layer
("gptq-act"), and the refiners that follow it in order: those that improve the solver's result ("comq") and bias
compensation ("bias"), which adds a bias. Plans, profiles and `--solver` write it as the names joined by "+"; every
name is checked against its registry when the text is read, so an unknown or misplaced name fails there, in one
line, and nothing downstream splits or compares strings.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Chain:
    solver: str
    refiners: tuple[str, ...] = ()
    transforms: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Chain":
        """The chain of "transform+…+solver+refiner+…" (names checked against the registries)."""
        from .solvers import SOLVERS
        from .transforms import TRANSFORMS

        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a solver chain is a name such as gptq-act+comq, got {text!r}")
        names = [n.strip() for n in text.split("+")]
        k = 0
        while k < len(names) and names[k] in TRANSFORMS:
            k += 1
        if k == len(names):
            raise ValueError(f"{text!r} names no solver after its transforms (e.g. {text}+gptq-act)")
        first = SOLVERS.lookup(names[k])
        if not first.starts:
            raise ValueError(f"{names[k]!r} refines another solver's result: name a solver first "
                             f"(e.g. gptq-act+{names[k]})")
        for name in names[k + 1:]:
            if name in TRANSFORMS:
                raise ValueError(f"{text!r}: the transform {name!r} changes the whole model and comes first "
                                 f"({name}+{'+'.join(n for n in names if n != name)})")
            if name not in SOLVERS:
                raise ValueError(f"unknown refiner {name!r}; known: "
                                 + ", ".join(sorted(n for n, s in SOLVERS.items() if s.refines)))
            if not SOLVERS.lookup(name).refines:
                raise ValueError(f"{text!r}: {name!r} is a solver of its own, not a refiner that can follow "
                                 "another; refiners: " + ", ".join(sorted(n for n, s in SOLVERS.items() if s.refines)))
        if len(set(names[k + 1:])) < len(names) - k - 1:
            raise ValueError(f"{text!r} names a refiner twice")
        return cls(names[k], tuple(names[k + 1:]), tuple(names[:k]))

    def __str__(self) -> str:
        return "+".join((*self.transforms, self.solver, *self.refiners))

    @property
    def steps(self) -> tuple[str, ...]:
        """The solver, then its refiners."""
        return (self.solver, *self.refiners)

    @property
    def layer(self) -> "Chain":
        """The per-layer part (no transforms): what a candidate names."""
        return replace(self, transforms=())

    @property
    def bias(self) -> bool:
        """Whether a step adds a bias (solvers.bias): the layer then stores one, and its bits count."""
        from .solvers import SOLVERS

        return any(SOLVERS[s].adds_bias for s in self.steps)

    @property
    def needs(self) -> frozenset[str]:
        """The statistics its steps need (capture's names)."""
        from .solvers import SOLVERS

        return frozenset().union(*(SOLVERS[s].needs for s in self.steps))

    def profiled(self) -> "Chain":
        """The chain the profile runs in this one's place: the solver's `profile_as`, and only the refiners the
        profile runs (`Solver.profiled`). The apply runs the whole chain."""
        from .solvers import SOLVERS

        first = SOLVERS[self.solver]
        return Chain(first.profile_as or self.solver, tuple(r for r in self.refiners if SOLVERS[r].profiled))

    def left_out(self) -> frozenset[str]:
        """The steps whose work the profile leaves out (comq's descent, standalone comq's included): candidates of
        several chains compare fairly on one profile only where this is the same for all."""
        from .solvers import SOLVERS

        return frozenset(s for s in self.steps if not SOLVERS[s].profiled)


def parse_list(text: str) -> tuple[tuple[str, ...], tuple[Chain, ...]]:
    """A `--solver` value, one chain or several joined by ",": (the transforms they share, the per-layer chains,
    in order, without repeats)."""
    chains = [Chain.parse(c) for c in text.split(",")]
    transforms = chains[0].transforms
    if any(c.transforms != transforms for c in chains):
        raise ValueError("the solvers of a --solver list share one whole-model transform (the model is turned "
                         f"once): {text!r} names different ones")
    return transforms, tuple(dict.fromkeys(c.layer for c in chains))


def check_list(chains) -> None:
    """Raise ValueError where several candidate chains cannot be compared on one profile: two profiled alike (their
    damages would tie, and the allocation would take the first), or chains that differ in what the profile leaves
    out (plain gptq beside gptq-act+comq would be judged as if it had the descent too)."""
    seen: dict[Chain, Chain] = {}
    for c in chains:
        p = c.profiled()
        if p in seen:
            raise ValueError(f"the profile cannot tell apart solvers it profiles alike (as {p}): {seen[p]} and {c} "
                             "would tie; name one of them")
        seen[p] = c
    if len({c.left_out() for c in chains}) > 1:
        raise ValueError("profiling leaves out comq's descent, so the solvers of a list must all end in it or none "
                         "(gptq+comq, not gptq, beside gptq-act+comq)")
