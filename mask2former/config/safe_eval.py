"""A restricted evaluator for the small expressions that config files compute values with.

The official Mask2Former configs write e.g.
``MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 640) for x in range(5, 21)]"]``.
:func:`safe_eval` computes such strings without Python's ``eval``: it walks the ``ast`` and
allows only

- literals: int, float, str, bool, None, and list / tuple / dict / set displays;
- arithmetic ``+ - * / // % **``, comparisons ``== != < <= > >= in not in``, ``and`` / ``or``,
  unary ``+ - not``;
- calls of ``int``, ``float``, ``round`` and ``range`` with positional arguments;
- names bound by comprehensions; list / set / dict comprehensions and generator expressions
  with ``for`` and ``if`` clauses. A generator expression is evaluated into a tuple, and a
  ``range`` inside the result (a list, tuple or dict value) becomes a list.

Anything else (attribute access, subscripts, lambdas, other names or calls, f-strings, ``%``
formatting of strings, bitwise operators, ``is``, conditional expressions, ...) raises
:class:`SafeEvalError` naming the construct. The work is bounded so that hostile input can
neither hang nor exhaust memory: the expression length and nesting, the size of every value
(range lengths, sequence repetition and concatenation, comprehension results, counting the
elements of nested containers), the total number of evaluation steps, the bits of integers
(checked before computing a power) and the length of strings are all limited (the ``MAX_*``
constants below); exceeding a limit raises :class:`SafeEvalError` too.
"""
import ast
import itertools
import operator
from typing import Any, Dict, Iterator, Optional

__all__ = ["SafeEvalError", "safe_eval"]

MAX_EXPR_CHARS = 1000  # length of the expression string
MAX_DEPTH = 50  # nesting of the syntax tree
MAX_ITEMS = 100_000  # elements of any one value, nested containers counted in full
MAX_STEPS = 300_000  # evaluation steps, comprehension iterations, elements compared or built
MAX_INT_BITS = 4096  # size of any integer
MAX_STR_CHARS = 10_000  # length of any string
MAX_ROUND_DIGITS = 100  # |ndigits| of round(x, ndigits): round(5, -10**9) would compute 10**10**9

_FUNCTIONS = {"int": int, "float": float, "round": round, "range": range}
_BIN_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMP_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_}
_CONSTANT_TYPES = (bool, int, float, str, type(None))
# Readable names for refused syntax; anything not listed is named by its ast class.
_REFUSED = {
    ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Slice: "slice",
    ast.Lambda: "lambda", ast.JoinedStr: "f-string", ast.FormattedValue: "f-string",
    ast.NamedExpr: "assignment expression (:=)", ast.Starred: "star unpacking (*)",
    ast.IfExp: "conditional expression (if/else)", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield", ast.Invert: "bitwise operator ~", ast.BitAnd: "bitwise operator &",
    ast.BitOr: "bitwise operator |", ast.BitXor: "bitwise operator ^",
    ast.LShift: "shift operator <<", ast.RShift: "shift operator >>",
    ast.MatMult: "operator @", ast.Is: "identity comparison (is)",
    ast.IsNot: "identity comparison (is not)",
}


class SafeEvalError(ValueError):
    """An expression uses a construct the config evaluator refuses, or exceeds one of its limits."""


def safe_eval(expr: str) -> Any:
    """The value of ``expr`` under the restricted grammar described in the module docstring."""
    if not isinstance(expr, str):
        raise SafeEvalError(f"the expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_CHARS:
        raise SafeEvalError(
            f"expression of {len(expr)} characters exceeds the limit of {MAX_EXPR_CHARS}")
    expr = expr.strip()  # leading spaces would be an IndentationError
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise SafeEvalError(f"not a valid Python expression: {e}") from None
    _check_depth(tree)
    return _Evaluator(expr).run(tree)


def _check_depth(tree: ast.AST) -> None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SafeEvalError(f"expression nesting exceeds the limit of {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _size(value: Any, memo: Dict[int, int]) -> int:
    """Elements of ``value`` with nested containers counted in full (shared ones once per use)."""
    if isinstance(value, str):
        return 1 + len(value)
    if isinstance(value, range):  # lazy, but it becomes a list in the result
        return max(1, len(value))
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return 1
    key = id(value)
    if key not in memo:
        children = itertools.chain(value, value.values()) if isinstance(value, dict) else value
        total = 1
        for child in children:
            total += _size(child, memo)
            if total > MAX_ITEMS:  # stop early: the caller refuses it anyway
                break
        memo[key] = total
    return memo[key]


class _Evaluator:
    def __init__(self, source: str):
        self.source = source
        self.steps = 0

    # ------------------------------------------------------------------ bookkeeping
    def run(self, tree: ast.Expression) -> Any:
        return self._plain(self.eval(tree.body, {}), {})

    def charge(self, n: int) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise SafeEvalError(f"the expression needs more than {MAX_STEPS} evaluation steps")

    def checked(self, value: Any, what: str) -> Any:
        """``value`` if it is within the size limits."""
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise SafeEvalError(f"{what} gives an integer of more than {MAX_INT_BITS} bits")
        if isinstance(value, str) and len(value) > MAX_STR_CHARS:
            raise SafeEvalError(f"{what} gives a string longer than {MAX_STR_CHARS} characters")
        if isinstance(value, (list, tuple, set, dict, range)):
            size = _size(value, {})
            if size > MAX_ITEMS:
                raise SafeEvalError(f"{what} gives more than {MAX_ITEMS} elements")
            self.charge(size)
        return value

    def refuse(self, node: ast.AST, what: Optional[str] = None) -> SafeEvalError:
        what = what or _REFUSED.get(type(node)) or f"{type(node).__name__} expression"
        segment = ast.get_source_segment(self.source, node) if hasattr(node, "lineno") else None
        if segment:
            what += f" ({segment[:60]}{'...' if len(segment) > 60 else ''})"
        return SafeEvalError(f"{what} is not allowed")

    def _plain(self, value: Any, memo: Dict[int, Any]) -> Any:
        """``value`` with ranges inside lists, tuples and dict values turned into lists."""
        if isinstance(value, range):
            return list(value)
        if isinstance(value, (list, tuple, dict)):
            key = id(value)
            if key not in memo:
                if isinstance(value, dict):
                    memo[key] = {k: self._plain(v, memo) for k, v in value.items()}
                else:
                    memo[key] = type(value)(self._plain(x, memo) for x in value)
            return memo[key]
        return value

    # ------------------------------------------------------------------ evaluation
    def eval(self, node: ast.AST, env: Dict[str, Any]) -> Any:
        self.charge(1)
        method = getattr(self, "_eval_" + type(node).__name__, None)
        if method is None:
            raise self.refuse(node)
        return method(node, env)

    def _eval_Constant(self, node: ast.Constant, env) -> Any:
        if not isinstance(node.value, _CONSTANT_TYPES):
            raise self.refuse(node, f"a constant of type {type(node.value).__name__}")
        return self.checked(node.value, "a literal")

    def _eval_List(self, node: ast.List, env) -> Any:
        return self.checked([self.eval(e, env) for e in node.elts], "a list display")

    def _eval_Tuple(self, node: ast.Tuple, env) -> Any:
        return self.checked(tuple(self.eval(e, env) for e in node.elts), "a tuple display")

    def _eval_Set(self, node: ast.Set, env) -> Any:
        return self.checked(self.compute(set, [self.eval(e, env) for e in node.elts], node=node),
                            "a set display")

    def _eval_Dict(self, node: ast.Dict, env) -> Any:
        if any(k is None for k in node.keys):
            raise self.refuse(node, "dict unpacking (**)")
        pairs = [(self.eval(k, env), self.eval(v, env)) for k, v in zip(node.keys, node.values)]
        return self.checked(self.compute(dict, pairs, node=node), "a dict display")

    def _eval_Name(self, node: ast.Name, env) -> Any:
        if node.id in env:
            return env[node.id]
        if node.id in _FUNCTIONS:
            raise self.refuse(node, f"using the function '{node.id}' other than by calling it")
        raise self.refuse(
            node, f"the name '{node.id}' (only names bound by a comprehension are defined)")

    def _eval_UnaryOp(self, node: ast.UnaryOp, env) -> Any:
        op = _UNARY_OPS.get(type(node.op))
        if op is None:
            raise self.refuse(node, _REFUSED.get(type(node.op)))
        operand = self.eval(node.operand, env)
        return self.checked(self.compute(op, operand, node=node), "a unary operator")

    def _eval_BoolOp(self, node: ast.BoolOp, env) -> Any:
        is_and = isinstance(node.op, ast.And)
        for value_node in node.values:
            value = self.eval(value_node, env)
            if bool(value) != is_and:  # short-circuit like Python
                return value
        return value

    def _eval_BinOp(self, node: ast.BinOp, env) -> Any:
        op = _BIN_OPS.get(type(node.op))
        if op is None:
            raise self.refuse(node, _REFUSED.get(type(node.op)))
        left, right = self.eval(node.left, env), self.eval(node.right, env)
        self._precheck_binop(node, left, right)
        return self.checked(self.compute(op, left, right, node=node), "the expression")

    def _precheck_binop(self, node: ast.BinOp, left: Any, right: Any) -> None:
        """Refuse operations whose result would be too big before Python computes it."""
        seq = (str, list, tuple)
        memo: Dict[int, int] = {}
        if isinstance(node.op, ast.Mult) and (
                isinstance(left, seq) and isinstance(right, int)
                or isinstance(right, seq) and isinstance(left, int)):
            sequence, count = (left, right) if isinstance(left, seq) else (right, left)
            limit = MAX_STR_CHARS if isinstance(sequence, str) else MAX_ITEMS
            # A string's characters, or the nested size of the sequence's elements.
            unit = len(sequence) if isinstance(sequence, str) else _size(sequence, memo) - 1
            if unit * max(count, 0) > limit:
                raise self.refuse(node, f"sequence repetition beyond {limit} elements")
        elif (isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int)
              and right > 0 and abs(left) > 1
              and right * (abs(left).bit_length() - 1) > MAX_INT_BITS):
            raise self.refuse(node, f"a power with more than {MAX_INT_BITS} bits")
        elif isinstance(node.op, ast.Mod) and isinstance(left, str):
            raise self.refuse(node, "string formatting with %")
        # Concatenation, comparison of the pieces, ...: work proportional to the operands.
        self.charge(_size(left, memo) + _size(right, memo))

    def _eval_Compare(self, node: ast.Compare, env) -> Any:
        left = self.eval(node.left, env)
        for op_node, right_node in zip(node.ops, node.comparators):
            op = _CMP_OPS.get(type(op_node))
            if op is None:
                raise self.refuse(node, _REFUSED.get(type(op_node)))
            right = self.eval(right_node, env)
            memo: Dict[int, int] = {}
            self.charge(_size(left, memo) + _size(right, memo))
            result = self.compute(op, left, right, node=node)
            if not result:
                return result
            left = right
        return result

    def _eval_Call(self, node: ast.Call, env) -> Any:
        if not isinstance(node.func, ast.Name):  # e.g. x.attr(), (lambda: 0)(), f()()
            raise self.refuse(node.func, _REFUSED.get(type(node.func), "calling a computed value"))
        name = node.func.id
        if name not in _FUNCTIONS or name in env:
            raise self.refuse(node, f"calling '{name}' (only int, float, round and range can be called)")
        if node.keywords:
            raise self.refuse(node, f"keyword arguments to {name}()")
        args = [self.eval(a, env) for a in node.args]
        if name == "round" and len(args) == 2 and not (
                isinstance(args[1], int) and abs(args[1]) <= MAX_ROUND_DIGITS):
            raise self.refuse(node, f"round() to more than {MAX_ROUND_DIGITS} digits")
        if name == "range":
            self._precheck_range(node, args)
        return self.checked(self.compute(_FUNCTIONS[name], *args, node=node), f"{name}()")

    def _precheck_range(self, node: ast.Call, args) -> None:
        if not all(isinstance(a, int) for a in args):
            return  # range() itself raises the TypeError
        try:
            length = len(range(*args))
        except OverflowError:  # longer than sys.maxsize
            length = MAX_ITEMS + 1
        except (TypeError, ValueError) as e:
            raise SafeEvalError(f"range() failed: {e}") from None
        if length > MAX_ITEMS:
            raise self.refuse(node, f"a range longer than {MAX_ITEMS} elements")

    def compute(self, func, *args, node: ast.AST) -> Any:
        """``func(*args)`` with Python's errors reported as :class:`SafeEvalError`."""
        try:
            return func(*args)
        except (ArithmeticError, TypeError, ValueError) as e:
            segment = ast.get_source_segment(self.source, node) or ""
            raise SafeEvalError(f"evaluating '{segment[:60]}' failed: "
                                f"{type(e).__name__}: {e}") from None

    # ------------------------------------------------------------------ comprehensions
    def _eval_ListComp(self, node: ast.ListComp, env) -> Any:
        return self._collect(node, env, [node.elt], list)

    def _eval_GeneratorExp(self, node: ast.GeneratorExp, env) -> Any:
        return self._collect(node, env, [node.elt], tuple)

    def _eval_SetComp(self, node: ast.SetComp, env) -> Any:
        return self._collect(node, env, [node.elt], set)

    def _eval_DictComp(self, node: ast.DictComp, env) -> Any:
        return self._collect(node, env, [node.key, node.value], dict)

    def _collect(self, node, env, parts, kind) -> Any:
        items, size, memo = [], 0, {}
        for inner in self._iterate(node.generators, 0, env):
            values = [self.eval(part, inner) for part in parts]
            size += sum(_size(v, memo) for v in values)
            if size > MAX_ITEMS:
                raise self.refuse(node, f"a comprehension of more than {MAX_ITEMS} elements")
            items.append(values[0] if kind is not dict else tuple(values))
        return self.checked(self.compute(kind, items, node=node), "a comprehension")

    def _iterate(self, generators, index: int, env: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        """The environments of every iteration that passes the ``if`` clauses."""
        gen = generators[index]
        if gen.is_async:
            raise self.refuse(gen.iter, "async comprehension")
        iterable = self.eval(gen.iter, env)
        if not isinstance(iterable, (list, tuple, set, dict, range, str)):
            raise self.refuse(gen.iter, f"iterating over a value of type {type(iterable).__name__}")
        for item in iterable:
            self.charge(1)
            inner = dict(env)
            self._bind(gen.target, item, inner)
            if all(self.eval(cond, inner) for cond in gen.ifs):
                if index + 1 == len(generators):
                    yield inner
                else:
                    yield from self._iterate(generators, index + 1, inner)

    def _bind(self, target: ast.AST, value: Any, env: Dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            if not isinstance(value, (list, tuple, range, str)) or len(value) != len(target.elts):
                raise self.refuse(target, f"unpacking {value!r:.60} into {len(target.elts)} names")
            for sub_target, sub_value in zip(target.elts, value):
                self._bind(sub_target, sub_value, env)
        else:
            raise self.refuse(target, f"assigning to a {type(target).__name__}")
