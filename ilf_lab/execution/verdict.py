"""The verdict protocol, trusted side: asserts are planned and decided here, never in the program's process.

The program runs in a forked process ``H`` that it fully controls (see ``worker.py``), so nothing H says
can be a verdict.  Instead, in the harness process:

1. ``plan_item`` parses every test with ``ast``.  Each ``assert`` becomes a *site*: its comparison,
   boolean logic and literal operands form a small plan evaluated here; every other operand becomes a
   *probe*, an expression that must run in the program's namespace (``add(1, 2)``, ``candidate([1])``,
   ``root.v``).  The test is rewritten so that H only evaluates probes and reports their values:
   ``assert add(1, 2) == 3`` is sent to the sandbox as ``_ilf_emit_(0, lambda: (add(1, 2)))``; the ``3``
   never leaves this process (nor does the ``==``).
2. H writes one JSON line per executed site, ``[test, site, [value, ...]]``, then ``["done"]`` (or
   ``["error", reason]``), on a pipe separate from the program's stdout.  Values use a code-free encoding
   (``encode`` in ``worker.py``, ``decode_value`` here): JSON scalars plus type-tagged lists for
   int/float/complex/str/bytes/bool/None, list/tuple/set/frozenset/dict and a few stdlib value types.
   Anything else (e.g. an object of a class the program defines) arrives as an *opaque* marker that
   cannot be compared: an assert that needs it fails closed.
3. ``Judge`` decodes each line (no code runs), evaluates the site's plan (exact ``==`` or approx), and
   decides.  ``passed`` needs: every line well-formed, every site's plan true, ``["done"]`` last, and
   each *once* site (a module-level assert, or one directly in the body of a ``check`` function the test
   calls exactly once) reported exactly once.  Missing, repeated, malformed or extra lines fail.

A program can still choose any value for any probe (it is its own process): the guarantee is that the
verdict is the test's logic applied here to values the program reported, against expected values it
never saw.  ``ItemPlan.trust`` says whether that holds for *every* assert of an item ("sealed") or only
for some ("partial": asserts in loops/branches, both sides computed in the sandbox, a probe that calls
something other than the program, asserts inside try/with left to run in-process).  See docs/sandbox.md.

One module over the usual ~400 lines: the planner and the judge must agree on every site's shape, and keeping the
whole trusted decision procedure in one place is what makes it reviewable.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import json
import math
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

EMIT = "_ilf_emit_"  # the name the rewritten tests call in the sandbox
SEALED, PARTIAL = "sealed", "partial"
MAX_DEPTH = 200  # nesting of a decoded value
MAX_INT_BITS = 1 << 20  # arithmetic here on a program's ints stays cheap
MAX_SEQ = 10_000_000  # elements a sequence repetition here may produce
# builtins a probe may wrap a program call in and still count as "program-facing" (they normalise values;
# they cannot see the expected value, which stays here)
NORMALIZERS = frozenset(
    "abs bool bytes dict float frozenset int len list max min repr reversed round set sorted str sum tuple".split()
)
_CMP = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_BIN = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
}
# nodes that make a probe "test logic" rather than a call into the program
_LOGIC = (
    ast.Compare,
    ast.BoolOp,
    ast.IfExp,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
    ast.NamedExpr,
    ast.Await,
    ast.Yield,
    ast.YieldFrom,
)
_NO_LAMBDA = (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)  # cannot move into a lambda


# --------------------------------------------------------------------------- values


class Unverifiable(Exception):
    """A value that could not leave the sandbox was needed for the decision: fail closed."""


class Opaque:
    """A probe value of a type the channel does not carry (e.g. a class the program defines).

    It can be tested for truth (H reports ``bool(value)``, which the program controls anyway) and for
    identity with None/True/False; any comparison, arithmetic or hashing-by-value raises Unverifiable.
    """

    __slots__ = ("type_name", "truth")

    def __init__(self, type_name: str, truth: bool | None) -> None:
        self.type_name, self.truth = type_name, truth

    def _refuse(self, *_a):
        raise Unverifiable(f"a value of type {self.type_name} cannot be checked outside the sandbox")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __contains__ = __len__ = __iter__ = _refuse  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse  # type: ignore[assignment]
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __abs__ = __neg__ = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self) -> bool:
        if self.truth is None:
            self._refuse()
        return bool(self.truth)

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


@dataclass(frozen=True)
class Raised:
    """A probe raised in the sandbox; the assert fails with it only if its value is needed."""

    reason: str


class Malformed(ValueError):
    pass


def decode_value(x, depth: int = 0):
    """One encoded probe value -> a plain Python value; never runs code; Malformed on anything unexpected."""
    if depth > MAX_DEPTH:
        raise Malformed("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str or t is float:
        return x
    if t is int:
        if not -(2**53) < x < 2**53:
            raise Malformed("bare integer out of range")
        return x
    if t is not list or not x or type(x[0]) is not str:
        raise Malformed("unexpected value encoding")
    tag, rest = x[0], x[1:]
    d = depth + 1
    try:
        if tag == "l":
            return [decode_value(v, d) for v in rest]
        if tag == "t":
            return tuple(decode_value(v, d) for v in rest)
        if tag == "s":
            return {decode_value(v, d) for v in rest}
        if tag == "f":
            return frozenset(decode_value(v, d) for v in rest)
        if tag in ("d", "od"):
            pairs = []
            for p in rest:
                if type(p) is not list or len(p) != 2:
                    raise Malformed("bad dict item")
                pairs.append((decode_value(p[0], d), decode_value(p[1], d)))
            return dict(pairs) if tag == "d" else OrderedDict(pairs)
        if tag == "q":
            return deque(decode_value(v, d) for v in rest)
        if len(rest) == 1 and type(rest[0]) is str:
            s = rest[0]
            if tag == "I":
                return int(s, 16)  # power-of-two base: no digit limit, linear time
            if tag == "b":
                return bytes.fromhex(s)
            if tag == "ba":
                return bytearray.fromhex(s)
            if tag == "D":
                return Decimal(s)
            if tag == "x":
                if depth:
                    raise Malformed("exception marker inside a value")
                return Raised(" ".join(s.split())[:300])
        if tag == "j" and len(rest) == 2 and all(type(v) in (int, float) for v in rest):
            return complex(rest[0], rest[1])
        if tag == "F" and len(rest) == 2 and all(type(v) is str for v in rest):
            return Fraction(int(rest[0], 16), int(rest[1], 16))
        if tag == "r" and len(rest) == 3 and all(type(v) is int for v in rest):
            return range(*rest)
        if (
            tag == "o"
            and len(rest) == 2
            and type(rest[0]) is str
            and (rest[1] is None or type(rest[1]) is bool)
        ):
            return Opaque(rest[0][:100], rest[1])
    except (TypeError, ValueError, ArithmeticError) as e:  # unhashable set item, bad hex, zero denominator...
        raise Malformed(f"bad {tag!r} value ({type(e).__name__})") from None
    raise Malformed(f"unknown value tag {tag!r}")


def approx_eq(actual, expected) -> bool:
    """pytest.approx-like equality: numbers within rel 1e-6 / abs 1e-12, recursing into containers."""
    num = (int, float, complex)
    if isinstance(actual, num) and isinstance(expected, num) and not isinstance(actual, bool):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        if isinstance(actual, complex) or isinstance(expected, complex):
            return abs(actual - expected) <= max(1e-6 * abs(expected), 1e-12)
        if math.isinf(actual) or math.isinf(expected):
            return actual == expected
        return abs(actual - expected) <= max(1e-6 * abs(expected), 1e-12)
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return (
            type(actual) is type(expected)
            and len(actual) == len(expected)
            and all(approx_eq(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(approx_eq(actual[k], expected[k]) for k in expected)
    return bool(actual == expected)


def _size_guard(a, b, op: str) -> None:
    """Arithmetic here runs on values a program chose: refuse what would cost more than the test could mean."""
    for x in (a, b):
        if type(x) is int and x.bit_length() > MAX_INT_BITS:
            raise Unverifiable(f"integer too large for {op!r} outside the sandbox")
    if op == "*":
        for s, n in ((a, b), (b, a)):
            if isinstance(s, (str, bytes, list, tuple)) and type(n) is int and len(s) * max(n, 0) > MAX_SEQ:
                raise Unverifiable("sequence repetition too large outside the sandbox")
    if op == "**" and type(a) is int and type(b) is int and b > 0 and a.bit_length() * b > MAX_INT_BITS:
        raise Unverifiable("power too large outside the sandbox")


def _binop(op: str, a, b):
    _size_guard(a, b, op)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "//":
        return a // b
    if op == "%":
        if isinstance(a, (str, bytes)):  # printf-style formatting: not arithmetic
            raise Unverifiable("string formatting is not evaluated outside the sandbox")
        return a % b
    return a**b


def _identity(a, b) -> bool:
    singletons = (None, True, False, Ellipsis)
    if any(a is s for s in singletons) or any(b is s for s in singletons):
        return a is b
    raise Unverifiable("'is' between values that left the sandbox is undefined")


def _compare(op: str, a, b, approx: bool) -> bool:
    if op == "==":
        return approx_eq(a, b) if approx else bool(a == b)
    if op == "!=":  # exact in both modes, as before (approx only ever applied to ==)
        return bool(a != b)
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    if op == ">=":
        return bool(a >= b)
    if op == "in":
        return bool(a in b)
    if op == "not in":
        return bool(a not in b)
    if op == "is":
        return _identity(a, b)
    return not _identity(a, b)


class _ProbeRaised(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _eval(node: tuple, vals: list, approx: bool):
    kind = node[0]
    if kind == "c":
        return node[1]
    if kind == "p":
        v = vals[node[1]]
        if isinstance(v, Raised):
            raise _ProbeRaised(v.reason)
        return v
    if kind == "cmp":
        operands, ops = node[1], node[2]
        left = _eval(operands[0], vals, approx)
        for op, right_node in zip(ops, operands[1:], strict=True):
            right = _eval(right_node, vals, approx)
            if not _compare(op, left, right, approx):
                return False
            left = right
        return True
    if kind == "not":
        return not _eval(node[1], vals, approx)
    if kind in ("and", "or"):
        v = None
        for sub in node[1]:
            v = _eval(sub, vals, approx)
            if bool(v) == (kind == "or"):
                return v
        return v
    if kind == "abs":
        v = _eval(node[1], vals, approx)
        if not isinstance(v, (int, float, complex, Decimal, Fraction)):
            raise TypeError(f"bad operand type for abs(): '{type(v).__name__}'")
        return abs(v)
    if kind == "bin":
        return _binop(node[1], _eval(node[2], vals, approx), _eval(node[3], vals, approx))
    raise AssertionError(f"unknown plan node {kind!r}")  # a bug in the planner, not the program


def _one_line(s: str) -> str:
    return " ".join(s.split())[:300]


def _reason(e: BaseException) -> str:
    name = type(e).__name__
    try:
        msg = _one_line(str(e))
    except Exception:
        msg = ""
    return f"{name}: {msg}" if msg else name


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Site:
    """One assert: a plan over probe values; ``once``: must be reported exactly once."""

    test: int
    k: int
    plan: tuple
    nprobes: int
    msg: tuple | None  # ("c", value) or ("p", j); None: no message
    once: bool
    split_ok: bool  # at most one sandbox-computed side per comparison, no test logic inside a probe
    probe_names: frozenset  # free names the probes use (checked against the program's names)


@dataclass(frozen=True)
class TestPlan:
    source: str  # what the sandbox runs
    sites: tuple[Site, ...]
    shape_ok: (
        bool  # only statements that cannot carry a check of their own (see _shape_ok), no in-process assert
    )
    test_names: frozenset  # names the test itself binds (check's parameters excluded)
    params: frozenset  # parameters of the once-called check function (e.g. HumanEval's candidate)
    folded: frozenset = frozenset()  # builtins the parent evaluates for this test (abs, tuple, ...)


@dataclass
class ItemPlan:
    sources: list[str]
    tests_plans: list[TestPlan] = field(default_factory=list)
    sites: dict[tuple[int, int], Site] = field(default_factory=dict)
    once: frozenset = frozenset()
    trust: str = SEALED


_LITERAL_NODES = (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.BinOp)


def _literal(node: ast.AST):
    """(True, value) if ``node`` is a literal (what ``ast.literal_eval`` accepts), else (False, None)."""
    if type(node) is ast.Constant:
        return True, node.value
    if isinstance(node, ast.Call):
        if not (
            isinstance(node.func, ast.Name) and node.func.id == "set" and not node.args and not node.keywords
        ):
            return False, None
    elif not isinstance(node, _LITERAL_NODES):
        return False, None
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


# pure builtins the parent may evaluate itself on constant arguments (constant folding), and abs() also on a
# probe's value; not used when the program, setup or test could mean another function by that name
FOLDABLE = frozenset(
    "abs bool complex float frozenset int len list max min round set sorted str sum tuple".split()
)
_UNARY = {ast.USub: lambda v: -v, ast.UAdd: lambda v: +v, ast.Not: lambda v: not v, ast.Invert: lambda v: ~v}
_NOT_FOLDED = (False, None)


def _fold(node: ast.AST, fns: frozenset, used: set[str]):
    """(True, value) if the parent can compute ``node`` alone: literals, displays, arithmetic and ``fns``
    (pure builtins) over them; else (False, None).  Anything that would raise is left to the sandbox."""
    ok, value = _literal(node)
    if ok:
        return ok, value
    t = type(node)
    try:
        if t in (ast.Tuple, ast.List, ast.Set):
            vals = []
            for e in node.elts:  # type: ignore[attr-defined]
                ok, v = (False, None) if isinstance(e, ast.Starred) else _fold(e, fns, used)
                if not ok:
                    return _NOT_FOLDED
                vals.append(v)
            return True, (tuple(vals) if t is ast.Tuple else list(vals) if t is ast.List else set(vals))
        if t is ast.BinOp and type(node.op) in _BIN:  # type: ignore[attr-defined]
            ok1, a = _fold(node.left, fns, used)  # type: ignore[attr-defined]
            ok2, b = _fold(node.right, fns, used) if ok1 else _NOT_FOLDED  # type: ignore[attr-defined]
            return (True, _binop(_BIN[type(node.op)], a, b)) if ok2 else _NOT_FOLDED  # type: ignore[attr-defined]
        if t is ast.Subscript:
            ok, v = _fold(node.value, fns, used)  # type: ignore[attr-defined]
            sl = node.slice  # type: ignore[attr-defined]
            if not ok:
                return _NOT_FOLDED
            if isinstance(sl, ast.Slice):
                parts = []
                for part in (sl.lower, sl.upper, sl.step):
                    ok, x = (True, None) if part is None else _fold(part, fns, used)
                    if not ok:
                        return _NOT_FOLDED
                    parts.append(x)
                return True, v[slice(*parts)]
            ok, k = _fold(sl, fns, used)
            return (True, v[k]) if ok else _NOT_FOLDED
        if t is ast.UnaryOp and type(node.op) in _UNARY:  # type: ignore[attr-defined]
            ok, v = _fold(node.operand, fns, used)  # type: ignore[attr-defined]
            return (True, _UNARY[type(node.op)](v)) if ok else _NOT_FOLDED  # type: ignore[attr-defined]
        if (
            t is ast.Call
            and isinstance(node.func, ast.Name)  # type: ignore[attr-defined]
            and node.func.id in fns  # type: ignore[attr-defined]
            and not node.keywords  # type: ignore[attr-defined]
        ):
            args = []
            for a in node.args:  # type: ignore[attr-defined]
                ok, v = (False, None) if isinstance(a, ast.Starred) else _fold(a, fns, used)
                if not ok:
                    return _NOT_FOLDED
                if isinstance(v, (str, bytes, list, tuple, set, frozenset, dict)) and len(v) > MAX_SEQ:
                    return _NOT_FOLDED
                args.append(v)
            used.add(node.func.id)  # type: ignore[attr-defined]
            return True, getattr(builtins, node.func.id)(*args)  # type: ignore[attr-defined]
    except Exception:  # e.g. 1 / 0, int("x"), a size guard: the sandbox evaluates it, as before
        return _NOT_FOLDED
    return _NOT_FOLDED


def _hides_const(node: ast.AST, fns: frozenset) -> bool:
    """Whether splitting ``node`` here keeps a constant (an expected value) out of the sandbox."""
    if _fold(node, fns, set())[0]:
        return True
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        return _hides_const(node.left, fns) or _hides_const(node.right, fns)
    if _is_abs(node, fns):
        return _hides_const(node.args[0], fns)  # type: ignore[attr-defined]
    return False


def _is_abs(node: ast.AST, fns: frozenset) -> bool:
    return (
        "abs" in fns
        and isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "abs"
        and len(node.args) == 1
        and not node.keywords
        and not isinstance(node.args[0], ast.Starred)
    )


def _scan(node: ast.AST, names: set[str]) -> tuple[bool, bool]:
    """One pass over a probe: collects its free names -> (has test logic, cannot move into a lambda)."""
    logic = nolambda = False
    stack = [node]
    while stack:
        n = stack.pop()
        t = type(n)
        if t is ast.Constant:
            continue
        if t is ast.Name:
            names.add(n.id)  # type: ignore[attr-defined]
            continue
        if t in (ast.List, ast.Tuple, ast.Set):
            stack.extend(n.elts)  # type: ignore[attr-defined]
            continue
        if t is ast.Call:
            stack.append(n.func)  # type: ignore[attr-defined]
            stack.extend(n.args)  # type: ignore[attr-defined]
            stack.extend(k.value for k in n.keywords)  # type: ignore[attr-defined]
            continue
        if isinstance(n, _LOGIC):
            logic = True
            nolambda = nolambda or isinstance(n, _NO_LAMBDA)
        stack.extend(ast.iter_child_nodes(n))
    return logic, nolambda


class _SiteBuilder:
    def __init__(self, fns: frozenset, used: set[str]) -> None:
        self.fns = fns
        self.used = used  # builtins the plan evaluates here (so their names must mean the builtin)
        self.probes: list[ast.expr] = []
        self.names: set[str] = set()
        self.split_ok = True
        self.nolambda = False

    def probe(self, node: ast.expr) -> tuple:
        logic, nolambda = _scan(node, self.names)
        if logic or (self.fns != FOLDABLE and _hides_const(node, FOLDABLE)):
            # test logic (a comparison, a generator, an expected value under a helper the program
            # defines, such as its own abs) would run in the sandbox
            self.split_ok = False
        self.nolambda = self.nolambda or nolambda
        self.probes.append(node)
        return ("p", len(self.probes) - 1)

    def split(self, node: ast.expr) -> tuple:
        ok, value = _fold(node, self.fns, self.used)
        if ok:
            return ("c", value)
        if isinstance(node, ast.Compare):
            operands = [self.split(node.left)] + [self.split(c) for c in node.comparators]
            if sum(_uses_probe(o) for o in operands) > 1:
                self.split_ok = False  # both sides computed in the sandbox
            return ("cmp", operands, [_CMP[type(o)] for o in node.ops])
        if isinstance(node, ast.BoolOp):
            return ("and" if isinstance(node.op, ast.And) else "or", [self.split(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ("not", self.split(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN and _hides_const(node, self.fns):
            left, right = self.split(node.left), self.split(node.right)
            return ("bin", _BIN[type(node.op)], left, right)
        if _is_abs(node, self.fns) and _hides_const(node, self.fns):
            self.used.add("abs")
            return ("abs", self.split(node.args[0]))  # type: ignore[attr-defined]
        return self.probe(node)


def _uses_probe(node: tuple) -> bool:
    kind = node[0]
    if kind == "p":
        return True
    if kind == "c":
        return False
    if kind in ("cmp", "and", "or"):
        return any(_uses_probe(n) for n in node[1])
    if kind in ("not", "abs"):
        return _uses_probe(node[1])
    return _uses_probe(node[2]) or _uses_probe(node[3])  # bin


_DEF_ONLY = (
    ast.Import,
    ast.ImportFrom,
    ast.Assign,
    ast.AnnAssign,
    ast.Pass,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
)


def _shape_ok(body: list[ast.stmt], once_call: str | None) -> bool:
    """Statements that can only define things: no loop, branch, raise, try or bare call (other than the one
    call of the check function) that could act as a check running inside the sandbox."""
    for s in body:
        if isinstance(s, ast.Assert) or isinstance(s, _DEF_ONLY):
            continue
        if isinstance(s, ast.Expr) and isinstance(s.value, (ast.Constant, ast.Name)):
            continue
        if (
            once_call is not None
            and isinstance(s, ast.Expr)
            and isinstance(s.value, ast.Call)
            and isinstance(s.value.func, ast.Name)
            and s.value.func.id == once_call
        ):
            continue
        return False
    return True


def _once_def(tree: ast.Module) -> ast.FunctionDef | None:
    """A module-level ``def NAME`` (HumanEval's ``check``) the test calls exactly once, at module level,
    after defining it, with no other reference to NAME and no early exit from its body: the asserts
    directly in its body then run exactly once when the test completes."""
    defs = [s for s in tree.body if isinstance(s, ast.FunctionDef) and not s.decorator_list]
    if not defs:
        return None
    nodes = list(ast.walk(tree))
    for d in defs:
        name = d.name
        same = [
            n
            for n in nodes
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name
        ]
        uses = [n for n in nodes if isinstance(n, ast.Name) and n.id == name]
        calls = [
            i
            for i, s in enumerate(tree.body)
            if isinstance(s, ast.Expr)
            and isinstance(s.value, ast.Call)
            and isinstance(s.value.func, ast.Name)
            and s.value.func.id == name
        ]
        if len(same) != 1 or len(uses) != 1 or len(calls) != 1 or calls[0] < tree.body.index(d):
            continue
        exits = [
            n
            for s in d.body
            for n in _walk_no_defs(s)
            if isinstance(
                n, (ast.Return, ast.Raise, ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal)
            )
        ]
        if not exits:
            return d
    return None


def _walk_no_defs(node: ast.AST):
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            yield from _walk_no_defs(child)


def _target_names(t: ast.AST, out: set[str]) -> None:
    if isinstance(t, ast.Name):
        out.add(t.id)
    elif isinstance(t, (ast.Tuple, ast.List)):
        for e in t.elts:
            _target_names(e, out)
    elif isinstance(t, ast.Starred):
        _target_names(t.value, out)


def _stmt_names(body: list[ast.stmt], out: set[str], into_defs: bool) -> None:
    """Names bound by statements (assignments, defs, classes, imports, loop/with targets, parameters).

    Names bound inside expressions (walrus, comprehension targets) are left out: an assert whose probe
    holds one is not sealed anyway."""
    for s in body:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(s.name)
            if into_defs and not isinstance(s, ast.ClassDef):
                a = s.args
                out.update(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
                out.update(x.arg for x in (a.vararg, a.kwarg) if x is not None)
            if into_defs:
                _stmt_names(s.body, out, into_defs)
            continue
        if isinstance(s, ast.Assign):
            for t in s.targets:
                _target_names(t, out)
        elif isinstance(s, (ast.AnnAssign, ast.AugAssign)):
            _target_names(s.target, out)
        elif isinstance(s, (ast.For, ast.AsyncFor)):
            _target_names(s.target, out)
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            for item in s.items:
                if item.optional_vars is not None:
                    _target_names(item.optional_vars, out)
        elif isinstance(s, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in s.names)
        elif isinstance(s, (ast.Global, ast.Nonlocal)):
            out.update(s.names)
        for attr in ("body", "orelse", "finalbody"):
            sub = getattr(s, attr, None)
            if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                _stmt_names(sub, out, into_defs)
        for h in getattr(s, "handlers", []):
            if h.name:
                out.add(h.name)
            _stmt_names(h.body, out, into_defs)
        for case in getattr(s, "cases", []):
            _stmt_names(case.body, out, into_defs)


# what ast.parse raises on hostile source; SystemError: CPython 3.11's "AST constructor recursion depth mismatch"
# on deeply nested model-written programs (seen in a powered run's evaluate stage, where it ended the run)
UNPARSABLE = (SyntaxError, ValueError, MemoryError, RecursionError, SystemError)


def program_names(src: str, unparsable: frozenset | None = frozenset()) -> frozenset | None:
    """Names the program (or setup) defines at module level by def/class/assignment (imports excluded: a
    probe like ``math.isclose(...)`` calls the standard library, not the program); `unparsable` when the
    parent cannot parse it (the trust check takes no names: it then allows fewer probes, the safe direction)."""
    try:
        tree = ast.parse(src)
    except UNPARSABLE:
        return unparsable
    out: set[str] = set()
    _stmt_names(tree.body, out, into_defs=False)
    imported: set[str] = set()
    for s in tree.body:
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in s.names)
    return frozenset(out - imported)


_NEWLINE = re.compile(r"\r\n|\r|\n")


class _Source:
    """Character offsets of ``ast`` positions (whose columns count UTF-8 bytes) in a source string."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.starts = [0] + [m.end() for m in _NEWLINE.finditer(src)]

    def offset(self, lineno: int, col: int) -> int:
        start = self.starts[lineno - 1]
        end = self.starts[lineno] if lineno < len(self.starts) else len(self.src)
        line = self.src[start:end]
        return start + (col if line.isascii() else len(line.encode()[:col].decode(errors="replace")))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (
            self.offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
            self.offset(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
        )

    def segment(self, node: ast.AST) -> str:
        a, b = self.span(node)
        return self.src[a:b]


class _Rewriter:
    """Finds the asserts of one test, plans them, and splices ``_ilf_emit_`` calls over them in the text
    (so the rest of the test, and its line numbers, stay as written)."""

    def __init__(self, src: str, fns: frozenset, once_def: ast.FunctionDef | None) -> None:
        self.text = _Source(src)
        self.fns = fns
        self.used: set[str] = set()
        self.once_def = once_def
        self.sites: list[Site] = []
        self.edits: list[tuple[int, int, str]] = []
        self.inproc = 0  # asserts left to run as plain asserts in the sandbox

    def body(self, stmts: list[ast.stmt], ctx: str) -> None:
        """ctx: "once" (runs exactly once: module level, or check's body), "nested", "inproc"."""
        for s in stmts:
            if isinstance(s, ast.Assert):
                self.site(s, ctx)
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.body(
                    s.body, "once" if s is self.once_def else ("inproc" if ctx == "inproc" else "nested")
                )
            elif isinstance(s, ast.ClassDef):
                self.body(s.body, "inproc")  # lambdas cannot see class scope
            elif isinstance(s, (ast.With, ast.AsyncWith, ast.Try, getattr(ast, "TryStar", ast.Try))):
                for attr in ("body", "orelse", "finalbody"):  # a handler could swallow an AssertionError
                    self.body(getattr(s, attr, None) or [], "inproc")
                for h in getattr(s, "handlers", []):
                    self.body(h.body, "inproc")
            else:
                sub = "inproc" if ctx == "inproc" else "nested"
                for attr in ("body", "orelse"):
                    v = getattr(s, attr, None)
                    if isinstance(v, list) and v and isinstance(v[0], ast.stmt):
                        self.body(v, sub)
                for case in getattr(s, "cases", []):  # match statements
                    self.body(case.body, sub)

    def site(self, s: ast.Assert, ctx: str) -> None:
        if ctx == "inproc":
            self.inproc += 1
            return
        b = _SiteBuilder(self.fns, self.used)
        plan = b.split(s.test)
        msg = None
        if s.msg is not None:
            ok, value = _fold(s.msg, self.fns, self.used)
            msg = ("c", value) if ok else b.probe(s.msg)
        if b.nolambda:  # a walrus/await/yield in an operand: leave this assert as it is
            self.inproc += 1
            return
        k = len(self.sites)
        self.sites.append(Site(0, k, plan, len(b.probes), msg, ctx == "once", b.split_ok, frozenset(b.names)))
        call = f"{EMIT}({k}" + "".join(f", lambda: ({self.text.segment(p)})" for p in b.probes) + ")"
        self.edits.append((*self.text.span(s), call))

    def source(self) -> str:
        src = self.text.src
        for a, b, text in sorted(self.edits, reverse=True):
            src = src[:a] + text + src[b:]
        return src


@functools.lru_cache(maxsize=8192)
def plan_test(src: str, shadowed: frozenset = frozenset()) -> TestPlan:
    """Rewrite one test string (cached: an ILF run checks many programs against the same tests).

    ``shadowed``: builtin names the program or setup may rebind, which the parent must then not evaluate.
    """
    try:
        tree = ast.parse(src)
    except UNPARSABLE:
        # the sandbox compiles it and reports the error (after running the program, like before)
        return TestPlan(src, (), False, frozenset(), frozenset())
    once = _once_def(tree)
    shape = _shape_ok(tree.body, once.name if once else None) and (once is None or _shape_ok(once.body, None))
    params = frozenset(a.arg for a in once.args.args) if once is not None else frozenset()
    bound: set[str] = set()
    _stmt_names(tree.body, bound, into_defs=True)
    rw = _Rewriter(src, FOLDABLE - shadowed - bound, once)
    rw.body(tree.body, "once")
    source = rw.source() if rw.sites else src
    return TestPlan(
        source,
        tuple(rw.sites),
        shape and rw.inproc == 0,
        frozenset(bound - params),
        params,
        frozenset(rw.used),
    )


def plan_item(program: str, setup: str, tests: list[str], trust: bool = True) -> ItemPlan:
    """Plans for one item's tests and the sources to send to the sandbox; with ``trust``, also the item's
    trust level (else call ``assess_trust`` later: the pool does it while the program runs)."""
    item = ItemPlan(sources=[], tests_plans=[])
    once = set()
    names: list[frozenset | None] | None = None  # the program's and the setup's, parsed once when needed
    for t, src in enumerate(tests):
        tp = plan_test(src)
        # The parent evaluates a builtin the test calls (abs, tuple, ...) itself unless the program or setup
        # defines that name at module level: then, as in Python, the test calls theirs.  (Rebinding it at
        # run time, e.g. ``builtins.abs = ...``, changes nothing here.)  The substring test spares the parse.
        maybe = [n for n in tp.folded if n in program or n in setup]
        if maybe:
            if names is None:
                names = [program_names(program, None), program_names(setup, None)]
            # unparsable here (e.g. 3.11's SystemError) may still compile in the sandbox: then every name the
            # text holds may be the program's own, and the parent evaluates none of them
            shadowed = frozenset(n for n in maybe if None in names or any(n in ns for ns in names if ns))
            if shadowed:
                tp = plan_test(src, shadowed)
        item.sources.append(tp.source)
        item.tests_plans.append(tp)
        for s in tp.sites:
            site = dataclasses.replace(s, test=t) if t else s
            item.sites[(t, s.k)] = site
            if site.once:
                once.add((t, s.k))
    item.once = frozenset(once)
    if trust:
        assess_trust(item, program, setup)
    return item


def assess_trust(item: ItemPlan, program: str, setup: str) -> str:
    """ "sealed" iff every assert is a once-site whose comparison is split (at most one side computed in the
    sandbox, no test logic inside a probe) and whose probes only call into the program (names the program or
    setup defines, check's parameters, value normalisers such as sorted), and the tests hold no statement
    that could act as a check of its own; else "partial"."""
    sealed = True
    if item.tests_plans:
        defined = program_names(program) | (program_names(setup) if setup else frozenset())
        for tp in item.tests_plans:
            allowed = (defined - tp.test_names) | tp.params | NORMALIZERS
            sealed = (
                sealed
                and tp.shape_ok
                and all(s.once and s.split_ok and s.probe_names <= allowed for s in tp.sites)
            )
    item.trust = SEALED if sealed else PARTIAL
    return item.trust


# --------------------------------------------------------------------------- deciding


class Judge:
    """Decides one item from the sandbox's channel lines; the first failure (in channel order) wins."""

    def __init__(self, plan: ItemPlan, approx: bool = False) -> None:
        self.plan = plan
        self.approx = approx
        self.counts: dict[tuple[int, int], int] = {}
        self.failure: str | None = None
        self.done = False

    def feed(self, line: str) -> None:
        if self.failure is not None:
            return
        if self.done:
            self._fail("result channel: data after the end record")
            return
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            self._fail("result channel: malformed record")
            return
        if rec == ["done"]:
            self.done = True
            return
        if type(rec) is list and len(rec) == 2 and rec[0] == "error" and type(rec[1]) is str:
            self._fail(_one_line(rec[1]) or "error")
            return
        if not (
            type(rec) is list
            and len(rec) == 3
            and type(rec[0]) is int
            and type(rec[1]) is int
            and type(rec[2]) is list
            and (rec[0], rec[1]) in self.plan.sites
        ):
            self._fail("result channel: malformed record")
            return
        key = (rec[0], rec[1])
        site = self.plan.sites[key]
        self.counts[key] = self.counts.get(key, 0) + 1
        if site.once and self.counts[key] > 1:
            self._fail(f"result channel: assert {site.k} of test {site.test} reported twice")
            return
        if len(rec[2]) != site.nprobes:
            self._fail("result channel: malformed record")
            return
        try:
            vals = [decode_value(v) for v in rec[2]]
        except (Malformed, RecursionError):
            self._fail("result channel: malformed value")
            return
        self.failure = self._decide(site, vals)

    def _decide(self, site: Site, vals: list) -> str | None:
        try:
            if _eval(site.plan, vals, self.approx):
                return None
        except _ProbeRaised as e:
            return f"failed: {e.reason}"
        except Unverifiable as e:
            return f"failed: {e}"
        except RecursionError:
            return "failed: value nested too deeply to compare"
        except Exception as e:  # a comparison raising, as the assert would have in the program's process
            return f"failed: {_reason(e)}"
        msg = ""
        if site.msg is not None:
            v = site.msg[1] if site.msg[0] == "c" else vals[site.msg[1]]
            if not isinstance(v, (Raised, Opaque)):
                try:
                    msg = _one_line(str(v))
                except Exception:
                    msg = ""
        return f"failed: AssertionError: {msg}" if msg else "failed: AssertionError"

    def _fail(self, reason: str) -> None:
        self.failure = f"failed: {reason}"

    @property
    def complete(self) -> bool:
        """Every line decided "passed": the end record came, and each once-site reported exactly once."""
        return self.failure is None and self.done and all(self.counts.get(key) == 1 for key in self.plan.once)

    def missing(self) -> str:
        gone = sorted(key for key in self.plan.once if self.counts.get(key, 0) == 0)
        t, k = gone[0]
        return f"failed: assert {k} of test {t} never reported (the program interfered with the test)"
