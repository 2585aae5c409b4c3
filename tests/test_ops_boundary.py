"""Per-operation knowledge lives in rgap_audit/ops only.

Outside the ops package no module may test a layer class (`isinstance(m, nn.Conv2d)`) or compare with
an operation's name (`info.name == "BatchNorm"`, `name in ("ReLU", "ReLU6")`): the walk, the attack,
the tracer and the loader read OpInfo fields instead, so that supporting a new layer means one entry
in rgap_audit/ops. The oracle is the source itself, read with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rgap_audit.ops import OPS

PACKAGE = Path(__file__).resolve().parents[1] / "rgap_audit"
GENERIC = {"Module", "Parameter", "ModuleList", "ModuleDict", "Sequential"}  # containers and parameters, not layers
# strings that are both an op name (or a method name the table lists) and a torch.fx node kind or a type word
FX_WORDS = {"input", "output", "unknown", "float", "double", "to"}
OP_NAMES = ({info.name for info in OPS.values()} | {k for k in OPS if isinstance(k, str)}) - FX_WORDS


def _sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "ops" not in p.relative_to(PACKAGE).parts[:1]]


def _nn_attr(node: ast.AST) -> str | None:
    """`nn.X` or `torch.nn.X` -> X."""
    if isinstance(node, ast.Attribute):
        base = node.value
        if isinstance(base, ast.Name) and base.id == "nn":
            return node.attr
        if isinstance(base, ast.Attribute) and base.attr == "nn" and isinstance(base.value, ast.Name) and base.value.id == "torch":
            return node.attr
    return None


def _layer_class_tests(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            if len(node.args) != 2:
                continue
            classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            for c in classes:
                name = _nn_attr(c)
                if name is not None and name not in GENERIC:
                    out.append((node.lineno, f"{node.func.id}(..., nn.{name})"))
    return out


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def _op_name_comparisons(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                hit = [s for s in _strings(side) if s in OP_NAMES]
                if hit:
                    out.append((node.lineno, f"compares with op name(s) {hit}"))
        elif isinstance(node, (ast.Set, ast.Dict)):  # a family of op names held as data
            keys = node.elts if isinstance(node, ast.Set) else [k for k in node.keys if k is not None]
            names = [s for k in keys for s in _strings(k) if s in OP_NAMES]
            if len(names) >= 2:
                out.append((node.lineno, f"a set of op names {names}"))
    return out


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_op_specific_decisions_outside_the_ops_package(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits = _layer_class_tests(tree) + _op_name_comparisons(tree)
    assert not hits, "\n".join(f"{path.relative_to(PACKAGE)}:{line}: {what}" for line, what in hits)


def test_the_checks_catch_what_they_are_meant_to():
    """Negative control: the scanner flags each form it forbids."""
    bad = ast.parse(
        "isinstance(m, nn.Conv2d)\nisinstance(m, (torch.nn.Linear, nn.Module))\n"
        "info.name == 'BatchNorm'\nx in ('ReLU', 'ReLU6')\nHOMOGENEOUS = {'LeakyReLU', 'ReLU'}\n"
    )
    assert len(_layer_class_tests(bad)) == 2
    assert len(_op_name_comparisons(bad)) == 3
    good = ast.parse("isinstance(m, nn.Module)\nnode.op == 'output'\ninfo.kind == LAYER\n")
    assert not _layer_class_tests(good) and not _op_name_comparisons(good)
