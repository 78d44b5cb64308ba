"""A tiny, safe expression language for labels, compiled to Polars.

Specs are data that may come from anyone, so labels are never `eval`-ed: the string is parsed with
Python's `ast` and only comparisons, boolean logic, arithmetic and a few math functions on columns
and constants are accepted, e.g. ``income_50k == '50000+'`` or ``log1p(dwell_seconds)``.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import cast

import polars as pl

_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_FUNCTIONS = {
    "log1p": lambda e: e.log1p(),
    "abs": lambda e: e.abs(),
    "sqrt": lambda e: e.sqrt(),
}


class ExpressionError(ValueError):
    """The expression uses syntax or names outside the label language."""


@dataclass(frozen=True)
class Expression:
    source: str
    columns: frozenset[str]
    expr: pl.Expr


MAX_LENGTH = 1_000  # characters: a label is a short formula; a longer one is a mistake or an attack
MAX_DEPTH = 50  # nesting of its syntax tree


def _depth(node: ast.AST, limit: int) -> int:
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, depth = stack.pop()
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        stack += [(child, depth + 1) for child in ast.iter_child_nodes(current)]
    return deepest


def compile_expression(source: str) -> Expression:
    if len(source) > MAX_LENGTH:
        raise ExpressionError(f"expression of {len(source)} characters is over the limit of {MAX_LENGTH}")
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ExpressionError(
            f"not a valid expression: {source[:80]!r} ({getattr(exc, 'msg', type(exc).__name__)})"
        ) from None
    if _depth(tree, MAX_DEPTH) > MAX_DEPTH:
        raise ExpressionError(f"expression {source[:80]!r}... nests deeper than {MAX_DEPTH} levels")
    columns: set[str] = set()
    expr = _compile(tree.body, columns, source)
    if not isinstance(expr, pl.Expr):
        raise ExpressionError(f"expression {source!r} names no column")
    return Expression(source=source, columns=frozenset(columns), expr=expr)


def _constant(node: ast.AST, source: str) -> object:
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value  # type: ignore[operator]
    raise ExpressionError(f"expected a constant in {source!r}, got {ast.unparse(node)!r}")


def _compile(node: ast.AST, columns: set[str], source: str) -> pl.Expr | object:
    if isinstance(node, ast.Name):
        columns.add(node.id)
        return pl.col(node.id)
    if isinstance(node, ast.Constant):
        return _constant(node, source)
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, columns, source) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = (out & p) if isinstance(node.op, ast.And) else (out | p)  # type: ignore[operator]
        return out
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand, columns, source)
        if isinstance(node.op, ast.Not):
            return ~operand  # type: ignore[operator]
        if isinstance(node.op, ast.USub):
            return -operand  # type: ignore[operator]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_compile(node.left, columns, source), _compile(node.right, columns, source))
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left = _compile(node.left, columns, source)
        op, right_node = node.ops[0], node.comparators[0]
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right_node, (ast.List, ast.Tuple, ast.Set)):
                raise ExpressionError(f"'in' needs a list of constants in {source!r}")
            values = [_constant(v, source) for v in right_node.elts]
            member = cast(pl.Expr, left).is_in(values)
            return member if isinstance(op, ast.In) else ~member
        if type(op) in _COMPARE:
            return _COMPARE[type(op)](cast(pl.Expr, left), cast(pl.Expr, _compile(right_node, columns, source)))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if len(node.args) != 1 or node.keywords:
            raise ExpressionError(f"{node.func.id}() takes exactly one argument in {source!r}")
        return _FUNCTIONS[node.func.id](_compile(node.args[0], columns, source))
    raise ExpressionError(
        f"unsupported syntax {ast.unparse(node)!r} in {source!r}: use columns, constants, comparisons, "
        f"'in [...]', and/or/not, + - * /, and {sorted(_FUNCTIONS)}"
    )
