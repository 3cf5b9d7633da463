"""Loading a config file never executes code from it.

The restricted evaluator (mask2former/config/safe_eval.py) must give Python's own values for the
expressions the official configs use, and refuse everything else within bounded work; the YAML
loader (mask2former/config/safe_yaml.py) must refuse every other Python tag, naming the file, the
dotted key and the tag, through the library API and through train_net.py and demo/demo.py.
Hostile payloads try to create a sentinel file; each test asserts that it does not exist.
"""
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import mask2former
from mask2former.config import CfgNode, UnsafeConfigError, get_cfg
from mask2former.config.safe_eval import MAX_ITEMS, SafeEvalError, safe_eval
from mask2former.config.safe_yaml import load_config_yaml
from tests.test_config import CONFIGS, REPO, _flat, _load, _norm, _write

SLOW_LIMIT_S = 20  # a refused hostile expression must fail fast; generous for a loaded machine

# The form every official Mask2Former / SeMask config uses for MIN_SIZE_TRAIN (short side in
# [0.5, 2.0] x N), and SeMask-MaskFormer's [0.25, 1.75] x 640 variant.
OFFICIAL_EXPRESSIONS = [f"[int(x * 0.1 * {n}) for x in range(5, 21)]"
                        for n in (512, 640, 896, 1024, 2048, 1280)]
OFFICIAL_EXPRESSIONS.append("[int(0.25 * x * 640) for x in range(1, 8)]")


def _yaml_str(s: str) -> str:
    """``s`` as a double-quoted YAML scalar."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _eval_yaml(expr: str, key: str = "MIN_SIZE_TRAIN") -> str:
    return f"INPUT:\n  {key}: !!python/object/apply:eval [{_yaml_str(expr)}]\n"


# ----------------------------------------------------------------------------- configs/ unchanged
def _oracle_flat(path: Path) -> dict:
    """The flat values of ``path``'s `_BASE_` chain, each file read with plain yaml.safe_load,
    strings decoded as yacs does."""
    data = yaml.safe_load(path.read_text()) or {}
    bases = data.pop("_BASE_", [])
    out = {}
    for base in [bases] if isinstance(bases, str) else bases:
        out.update(_oracle_flat((path.parent / base).resolve()))
    out.update({k: _yacs_decode(v) for k, v in _flat(data).items()})
    return out


def _yacs_decode(value):
    # yacs reads a string that is a Python literal as that literal: "(640, 640)" -> (640, 640).
    if isinstance(value, str):
        try:
            return _norm(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            pass
    return value


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in CONFIGS.rglob("*.yaml")))
def test_every_config_equals_a_plain_safe_load_merge(path):
    """The restricted loader changes no value: the full merged config equals the defaults updated
    key by key with ``yaml.safe_load`` of each file of the chain. This oracle is computed here
    from the files themselves rather than from a snapshot, so it stays valid when defaults or
    configs change; the configs/ files carry no Python tags, so safe_load reads them fully."""
    expected = _flat(get_cfg())
    overrides = _oracle_flat(REPO / path)
    assert set(overrides) <= set(expected), "a config sets a key get_cfg() lacks"
    expected.update(overrides)
    assert _flat(_load(path)) == expected


# ----------------------------------------------------------------------------- the evaluator
@pytest.mark.parametrize("expr", OFFICIAL_EXPRESSIONS)
def test_official_expressions_equal_python_eval(expr):
    expected = eval(expr)  # trusted: the fixed strings above
    got = safe_eval(expr)
    assert got == expected and type(got) is list and all(type(v) is int for v in got)


@pytest.mark.parametrize("expr", OFFICIAL_EXPRESSIONS)
def test_official_expressions_through_a_config_file(tmp_path, expr):
    _write(tmp_path / "base.yaml", _eval_yaml(expr))
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\nINPUT:\n  MIN_SIZE_TEST: 512\n")
    cfg = get_cfg()
    cfg.merge_from_file(str(child))
    assert list(cfg.INPUT.MIN_SIZE_TRAIN) == eval(expr)
    assert CfgNode.load_yaml_with_base(str(child), allow_unsafe=True)["INPUT"] == {
        "MIN_SIZE_TRAIN": eval(expr), "MIN_SIZE_TEST": 512}


@pytest.mark.parametrize("expr", [
    "1 + 2 * 3 - 4 / 5", "7 // 2 % 3", "-2 ** 10", "+3", "not 0", "2 ** -2", "1 < 2 <= 2 != 3",
    "3 in [1, 2, 3]", "4 not in (1, 2)", "1 and 0 or 5", "round(2.675, 2)", "round(7.5)",
    "int('ff', 16)", "float('1.5') * 2", "'ab' * 2 + 'c'", "[1, 2] + [3] * 2", "{1: 'a', 'b': None}",
    "{1, 2, 2}", "(1,)", "[]", "True", "None", "[x * y for x in range(3) for y in range(x) if y]",
    "{x: x ** 2 for x in range(4) if x % 2}", "{x % 3 for x in range(10)}",
    "[a + b for a, (b, c) in [(1, (2, 3)), (4, (5, 6))]]", "[[x for x in range(y)] for y in range(4)]",
    "[int for int in range(3)]", "0 in []",
])
def test_allowed_expressions_equal_python_eval(expr):
    assert safe_eval(expr) == eval(expr)


def test_generator_and_range_results_become_plain_data():
    assert safe_eval("(x for x in range(3))") == (0, 1, 2)
    assert safe_eval("range(2, 5)") == [2, 3, 4]
    assert safe_eval("[range(2), {'a': range(1)}]") == [[0, 1], {"a": [0]}]


@pytest.mark.parametrize("expr, construct", [
    ("__import__('os').system('true')", "attribute access"),
    ("__import__('os')", "calling '__import__'"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute access"),
    ("[c for c in ().__class__.__base__.__subclasses__()]", "attribute access"),
    ("(1, 2)[0]", "subscript"),
    ("(lambda: 0)()", "lambda"),
    ("[f for f in [lambda: 0]]", "lambda"),
    ("open('x', 'w')", "calling 'open'"),
    ("exec('1')", "calling 'exec'"),
    ("eval('1')", "calling 'eval'"),
    ("getattr(1, 'real')", "calling 'getattr'"),
    ("globals()", "calling 'globals'"),
    ("len(range(10**12))", "calling 'len'"),
    ("int", "the function 'int'"),
    ("[int(1) for int in range(2)]", "calling 'int'"),
    ("round(1.5, ndigits=0)", "keyword arguments"),
    ("range(3)(1)", "calling a computed value"),
    ("x", "the name 'x'"),
    ("f'{1}'", "f-string"),
    ("'%s' % 1", "string formatting"),
    ("(y := 1)", "assignment expression"),
    ("1 if 1 else 0", "conditional expression"),
    ("[*range(2)]", "star unpacking"),
    ("{**{}}", "dict unpacking"),
    ("1 << 2", "shift operator"),
    ("~1", "bitwise operator"),
    ("1 is 1", "identity comparison"),
    ("b'x'", "type bytes"),
    ("1j", "type complex"),
    ("[x for x in 5]", "iterating over a value of type int"),
    ("import os", "not a valid Python expression"),
])
def test_refused_constructs_are_named(expr, construct):
    with pytest.raises(SafeEvalError, match="not allowed|not a valid") as info:
        safe_eval(expr)
    assert construct in str(info.value)


@pytest.mark.parametrize("expr, limit", [
    ("range(10**12)", "range longer than"),
    ("[x for x in range(10**9)]", "range longer than"),
    ("[[0] * 10**6 for _ in range(10**6)]", "range longer than"),
    ("[[0] * 1000 for _ in range(1000)]", "more than"),
    ("[x for x in range(10**5) for y in range(10**5)]", "more than"),
    ("[x for x in range(90000) if x in [0] * 90000]", "evaluation steps"),
    ("[0] * 10**9", "repetition"),
    ("[[[[[[0] * 10] * 10] * 10] * 10] * 10] * 10", "repetition"),
    ("[range(0)] * 10**9", "repetition"),
    ("'x' * 10**9", "repetition"),
    ("'x' * 9000 + 'y' * 9000", "string longer"),
    ("9**9**9", "power"),
    ("2 ** 10**100", "power"),
    ("10**1200 * 10**1200", "bits"),
    ("round(5, -10**9)", "round()"),
    ("1" + "+1" * 600, "characters exceeds"),
    ("[" * 60 + "]" * 60, "nesting"),
    ("1/0", "ZeroDivisionError"),
    ("2.0 ** 10**4", "OverflowError"),
])
def test_resource_bombs_fail_fast(expr, limit):
    start = time.monotonic()
    with pytest.raises(SafeEvalError) as info:
        safe_eval(expr)
    assert limit in str(info.value)
    assert time.monotonic() - start < SLOW_LIMIT_S


def test_largest_allowed_value_is_within_limits():
    assert len(safe_eval(f"[0] * {MAX_ITEMS - 1}")) == MAX_ITEMS - 1
    assert len(safe_eval(f"range({MAX_ITEMS})")) == MAX_ITEMS


# ----------------------------------------------------------------------------- hostile YAML files
def _hostile_tags(sentinel: Path):
    s = str(sentinel)
    return {
        "os.system": (f'!!python/object/apply:os.system ["touch {s}"]',
                      "!!python/object/apply:os.system"),
        "subprocess.check_output": (f'!!python/object/apply:subprocess.check_output [["touch", "{s}"]]',
                                    "!!python/object/apply:subprocess.check_output"),
        "object/new": (f'!!python/object/new:subprocess.Popen [["touch", "{s}"]]',
                       "!!python/object/new:subprocess.Popen"),
        "object/apply mapping form": ("!!python/object/apply:subprocess.run "
                                      f'{{args: [["touch", "{s}"]]}}',
                                      "!!python/object/apply:subprocess.run"),
        "name": ("!!python/name:os.system", "!!python/name:os.system"),
        "module": ("!!python/module:os", "!!python/module:os"),
        "object": ("!!python/object:argparse.Namespace {a: 1}", "!!python/object:argparse.Namespace"),
        "tuple": ("!!python/tuple [1, 2]", "!!python/tuple"),
        "verbatim tag": (f'!<tag:yaml.org,2002:python/object/apply:os.system> ["touch {s}"]',
                         "!!python/object/apply:os.system"),
        "builtins.eval": (f'!!python/object/apply:builtins.eval ["open({s!r}, \'w\')"]',
                          "!!python/object/apply:builtins.eval"),
        "eval of a tagged argument": (
            f'!!python/object/apply:eval [!!python/object/apply:os.system ["touch {s}"]]',
            "!!python/object/apply:eval"),
        "eval mapping form": (f'!!python/object/apply:eval {{args: ["open({s!r}, \'w\')"]}}',
                              "!!python/object/apply:eval"),
        "unknown local tag": ("!custom 1", "!custom"),
    }


_HOSTILE_NAMES = list(_hostile_tags(Path("x")))


def _assert_refused(path: Path, key: str, tag: str, sentinel: Path, **kwargs):
    with pytest.raises(UnsafeConfigError) as info:
        get_cfg().merge_from_file(str(path), **kwargs)
    assert isinstance(info.value, mask2former.UnsafeConfigError)  # README: the top-level name
    msg = str(info.value)
    assert f"'{path}'" in msg and f"key '{key}'" in msg and f"'{tag}'" in msg, msg
    assert not sentinel.exists()
    return msg


@pytest.mark.parametrize("name", _HOSTILE_NAMES)
@pytest.mark.parametrize("allow_unsafe", [True, False])
def test_hostile_tag_is_refused(tmp_path, name, allow_unsafe):
    sentinel = tmp_path / "pwned"
    value, tag = _hostile_tags(sentinel)[name]
    f = _write(tmp_path / "hostile.yaml", f"MODEL:\n  META_ARCHITECTURE: {value}\n")
    msg = _assert_refused(f, "MODEL.META_ARCHITECTURE", tag, sentinel, allow_unsafe=allow_unsafe)
    assert "line 2, column 22" in msg


@pytest.mark.parametrize("expr, construct", [
    ("__import__('os').system('touch {s}')", "attribute access"),
    ("open('{s}', 'w')", "calling 'open'"),
    ("exec(\"open('{s}', 'w')\")", "calling 'exec'"),
    ("eval(\"open('{s}', 'w')\")", "calling 'eval'"),
    ("getattr(__builtins__, 'open')('{s}', 'w')", "calling a computed value"),
    ("[c for c in ().__class__.__bases__[0].__subclasses__()]", "attribute access"),
    ("(lambda: open('{s}', 'w'))()", "lambda"),
    ("range(10**12)", "range longer"),
    ("[[0] * 10**6 for _ in range(10**6)]", "range longer"),
    ("9**9**9", "power"),
    ("1" + "+1" * 600, "characters exceeds"),
])
def test_hostile_eval_expression_is_refused(tmp_path, expr, construct):
    sentinel = tmp_path / "pwned"
    f = _write(tmp_path / "hostile.yaml", _eval_yaml(expr.replace("{s}", str(sentinel))))
    start = time.monotonic()
    msg = _assert_refused(f, "INPUT.MIN_SIZE_TRAIN", "!!python/object/apply:eval", sentinel)
    assert construct in msg and time.monotonic() - start < SLOW_LIMIT_S


def test_eval_tag_refused_without_allow_unsafe(tmp_path):
    f = _write(tmp_path / "x.yaml", _eval_yaml(OFFICIAL_EXPRESSIONS[0]))
    msg = _assert_refused(f, "INPUT.MIN_SIZE_TRAIN", "!!python/object/apply:eval", tmp_path / "none",
                          allow_unsafe=False)
    assert "unsafe" in msg and "allow_unsafe=False" in msg
    with pytest.raises(UnsafeConfigError, match="unsafe"):
        CfgNode.load_yaml_with_base(str(f))  # its default is allow_unsafe=False
    assert CfgNode.load_yaml_with_base(str(f), allow_unsafe=True)["INPUT"]["MIN_SIZE_TRAIN"][0] == 256


@pytest.mark.parametrize("where, text, key", [
    ("top level", "{value}\n", "(top level)"),
    ("in a list", "SOLVER:\n  STEPS: [1, {value}]\n", "SOLVER.STEPS[1]"),
    ("in a block list", "DATASETS:\n  TRAIN:\n    - a\n    - {value}\n", "DATASETS.TRAIN[1]"),
    ("in a nested mapping", "MODEL:\n  SWIN:\n    DEPTHS: {value}\n", "MODEL.SWIN.DEPTHS"),
    ("in a mapping key", "MODEL:\n  ? {value}\n  : 1\n", "MODEL"),
    ("in a set", "MODEL: !!set {{ ? {value} }}\n", "MODEL"),
    ("behind an alias", "A: &a [{value}]\nB: *a\n", "A[0]"),
])
def test_hostile_tag_anywhere_is_refused(tmp_path, where, text, key):
    sentinel = tmp_path / "pwned"
    f = _write(tmp_path / "hostile.yaml",
               text.format(value=f'!!python/object/apply:os.system ["touch {sentinel}"]'))
    _assert_refused(f, key, "!!python/object/apply:os.system", sentinel)


def test_hostile_tag_in_a_base_file_names_the_base(tmp_path):
    sentinel = tmp_path / "pwned"
    base = _write(tmp_path / "bases" / "evil.yaml",
                  f'SOLVER:\n  BASE_LR: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    child = _write(tmp_path / "child.yaml", "_BASE_: bases/evil.yaml\nSOLVER:\n  MAX_ITER: 10\n")
    with pytest.raises(UnsafeConfigError) as info:
        get_cfg().merge_from_file(str(child))
    msg = str(info.value)
    assert f"'{base}'" in msg and "key 'SOLVER.BASE_LR'" in msg and "os.system" in msg
    assert not sentinel.exists()


def test_aliases_are_walked_once(tmp_path):
    # Nine levels of nine aliases stand for 9**9 leaves; the walk must visit each node once.
    lines = ['a0: &a0 [!!python/object/apply:eval ["[1, 2]"]]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    f = _write(tmp_path / "laughs.yaml", "\n".join(lines) + "\n")
    start = time.monotonic()
    with open(f) as stream:
        data = load_config_yaml(stream, str(f), allow_unsafe=True)
    assert time.monotonic() - start < SLOW_LIMIT_S
    leaf = data["a9"]
    for _ in range(9):
        leaf = leaf[8]
    assert data["a0"] == [[1, 2]] and leaf == [[1, 2]]


def test_yaml_safe_loader_is_not_modified():
    # The config loader subclasses SafeLoader; the global loader must still refuse python tags.
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.safe_load("!!python/name:os.system")


# ----------------------------------------------------------------------------- entry points
def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def hostile_config(tmp_path):
    sentinel = tmp_path / "pwned"
    f = _write(tmp_path / "hostile.yaml",
               f'MODEL:\n  META_ARCHITECTURE: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    return f, sentinel


def _assert_cli_refused(proc, config: Path, sentinel: Path):
    assert proc.returncode != 0
    assert f"'{config}'" in proc.stderr and "key 'MODEL.META_ARCHITECTURE'" in proc.stderr
    assert "!!python/object/apply:os.system" in proc.stderr, proc.stderr[-3000:]
    assert not sentinel.exists()


@pytest.mark.slow
def test_train_net_refuses_hostile_config(tmp_path, hostile_config):
    config, sentinel = hostile_config
    proc = _run(["train_net.py", "--config-file", str(config), "OUTPUT_DIR", str(tmp_path / "out")],
                tmp_path)
    _assert_cli_refused(proc, config, sentinel)


@pytest.mark.slow
def test_demo_refuses_hostile_config(tmp_path, hostile_config):
    import cv2
    import numpy as np

    config, sentinel = hostile_config
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    proc = _run(["demo/demo.py", "--config-file", str(config), "--input", str(image),
                 "--output", str(tmp_path / "vis")], tmp_path)
    _assert_cli_refused(proc, config, sentinel)
