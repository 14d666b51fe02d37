"""A small, safe integer-expression parser shared by the arithmetic and countdown tasks.

Model output is parsed here, never with eval: the grammar is

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "-" NUMBER | "(" expr ")"

(`/` and negative literals only where the caller allows them). Every resource is bounded so
arbitrary text cannot hang or crash it: at most `MAX_TOKENS` tokens, `MAX_DIGITS` digits per
literal, `MAX_DEPTH` nested parentheses, and `|value| <= MAX_VALUE` for every intermediate result.
Every failure is an `ExprError` whose message says what is wrong.

A parsed expression is a tree: an `int` leaf or an `Op(op, left, right)` node. `to_text` prints a
tree with the fewest parentheses that still parse back to the same tree, so two texts are the same
expression exactly when their printed trees are equal.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_TOKENS = 256
MAX_DIGITS = 13
MAX_DEPTH = 32
MAX_VALUE = 10**12
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

_TOKEN = re.compile(r"\s*(?:(\d+)|(\S))", re.ASCII)


class ExprError(ValueError):
    """Text that is not a valid expression, or an expression that has no valid value."""


class Op(NamedTuple):
    """An operator node: `left op right`."""

    op: str
    left: Node
    right: Node


Node = int | Op


def tokenize(text: str, ops: str) -> list[int | str]:
    """Integer literals and operator/parenthesis characters of `text`; raises ExprError on anything else."""
    tokens: list[int | str] = []
    for match in _TOKEN.finditer(text):
        digits, char = match.groups()
        if len(tokens) >= MAX_TOKENS:
            raise ExprError(f"expression longer than {MAX_TOKENS} tokens")
        if digits is not None:
            if len(digits.lstrip("0")) > MAX_DIGITS:
                raise ExprError(f"number with more than {MAX_DIGITS} digits")
            tokens.append(int(digits))
        elif char in ops or char in "()":
            tokens.append(char)
        else:
            raise ExprError(f"unexpected character {char!r}")
    return tokens


class _Parser:
    """Recursive descent over a token list; nesting depth is bounded by MAX_DEPTH."""

    def __init__(self, tokens: list[int | str], negative_literals: bool):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.negative_literals = negative_literals

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> int | str | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = Op(op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = Op(op, node, self.factor())
        return node

    def factor(self) -> Node:
        token = self.take()
        if isinstance(token, int):
            return token
        if token == "-" and self.negative_literals and isinstance(self.peek(), int):
            return -self.take()
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExprError(f"more than {MAX_DEPTH} nested parentheses")
            node = self.expr()
            if self.take() != ")":
                raise ExprError("missing ')'")
            self.depth -= 1
            return node
        raise ExprError("expected a number or '('" if token is None else f"unexpected {token!r}")


def parse(text: str, ops: str = "+-*/", negative_literals: bool = False) -> Node:
    """The expression tree of `text` using operators `ops`; raises ExprError if it is not one."""
    parser = _Parser(tokenize(text, ops), negative_literals)
    node = parser.expr()
    if parser.peek() is not None:
        raise ExprError(f"unexpected {parser.peek()!r}")
    return node


def apply_op(op: str, left: int, right: int, positive: bool = False) -> int:
    """`left op right` with exact division only; `positive` also rejects results <= 0. Raises ExprError."""
    if op == "+":
        value = left + right
    elif op == "-":
        value = left - right
    elif op == "*":
        value = left * right
    elif right == 0:
        raise ExprError(f"division by zero: {left} / {right}")
    elif left % right:
        raise ExprError(f"inexact division: {left} / {right}")
    else:
        value = left // right
    if abs(value) > MAX_VALUE:
        raise ExprError(f"intermediate value beyond {MAX_VALUE}: {left} {op} {right}")
    if positive and value <= 0:
        raise ExprError(f"non-positive intermediate result: {left} {op} {right} = {value}")
    return value


def evaluate(node: Node, positive: bool = False) -> int:
    """The value of a tree (exact division; `positive`: every intermediate result must be > 0)."""
    if isinstance(node, int):
        return node
    return apply_op(node.op, evaluate(node.left, positive), evaluate(node.right, positive), positive)


def leaves(node: Node) -> list[int]:
    """The literals of a tree, left to right."""
    if isinstance(node, int):
        return [node]
    return leaves(node.left) + leaves(node.right)


def to_text(node: Node) -> str:
    """Canonical text: single spaces around operators, parentheses only where the tree needs them."""
    if isinstance(node, int):
        return str(node)
    left, right = to_text(node.left), to_text(node.right)
    if isinstance(node.left, Op) and PRECEDENCE[node.left.op] < PRECEDENCE[node.op]:
        left = f"({left})"
    if isinstance(node.right, Op) and PRECEDENCE[node.right.op] <= PRECEDENCE[node.op]:
        right = f"({right})"
    return f"{left} {node.op} {right}"
