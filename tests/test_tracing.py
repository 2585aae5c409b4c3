"""Tracing: the fallbacks in order, what the GraphModule records, the call-site rewrites, one-line errors."""

from __future__ import annotations

import inspect
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.errors import AuditError
from rgap_audit.layergraph import build_layer_graph
from rgap_audit.ops import AFFINE, EMBEDDING, LAYER, MERGE, UNKNOWN, wrappers
from rgap_audit.tracing import trace, trace_method

HERE = __file__


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _line(fn, needle: str) -> int:
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(src) if needle in text)


class ValueGate(nn.Module):
    """A submodule fx cannot trace: it branches on a tensor value."""

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            return x
        return -x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = ValueGate()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).flatten(1))


class WithFlag(nn.Module):
    """A flag argument with a default, plus matmuls with Parameters and constant arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(144, 3))
        self.v = nn.Parameter(torch.randn(2, 3))

    def forward(self, x, double_it=False):
        if double_it:
            x = x * 2
        h = F.leaky_relu(self.bn(self.conv(x)), 0.2).flatten(1) @ self.w
        return (h + 1.0) @ self.v.t() * 0.5


class ShapeBranch(nn.Module):
    """A branch on a shape: fx cannot trace it, torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        if x.shape[-1] > 5:
            x = self.bn(self.conv(x))
        return self.fc(F.leaky_relu(x, 0.3).flatten(1))


class ValueBranch(nn.Module):
    """A branch on a value in the model's own forward: nothing can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # the line the error must name
            return self.fc(x)
        return x


class BadShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))  # the failing call


def _same_output(gm, model, x):
    ref = model.double().eval()(x)
    torch.testing.assert_close(gm(x), ref)


def test_plain_fx_records_method_and_train_mode_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    gm = trace(model, rnd(1, 3, 6, 6))
    assert trace_method(gm) == "torch.fx"
    assert gm.meta["rgap_trace"]["failed_attempts"] == []
    (w,) = gm.meta["rgap_warnings"]
    assert w.startswith("1: BatchNorm2d is in training mode")
    assert model.training  # the caller's model is untouched
    assert trace(model.eval(), rnd(1, 3, 6, 6)).meta["rgap_warnings"] == []
    assert all(p.dtype == torch.float64 for p in gm.parameters())


def test_failing_submodule_becomes_a_not_understood_leaf():
    model = WithGate()
    x = rnd(1, 3, 8, 8)
    gm = trace(model, x, file=HERE)
    info = gm.meta["rgap_trace"]
    assert info["method"] == "fx-leaf-modules" and info["leaf_modules"] == ["gate"]
    (failed,) = info["failed_attempts"]
    assert failed.startswith("torch.fx:") and f"{HERE}:{_line(ValueGate.forward, 'if x.sum()')}" in failed
    lg = build_layer_graph(gm)
    gate = lg.node("gate")
    assert gate.info.kind == UNKNOWN and gate.info.name == "ValueGate"
    assert [n for n in lg.weighted()] == ["fc", "conv"]
    _same_output(gm, model, x)


def test_flag_arguments_are_fixed_and_call_sites_rewritten():
    model = WithFlag()
    x = rnd(1, 3, 8, 8)
    gm = trace(model, x)
    info = gm.meta["rgap_trace"]
    assert info["method"] == "fx-concrete-args"
    assert info["concrete_args"] == {"double_it": "False"}
    lg = build_layer_graph(gm)
    by_target = {lg.node(n).fx.target: lg.node(n) for n in lg.graph.nodes}
    assert by_target[wrappers.linear_matmul].info.kind == LAYER
    assert by_target[wrappers.linear_matmul_t].info.kind == LAYER
    assert by_target[wrappers.shift_add].info.kind == AFFINE  # h + 1.0
    assert by_target[wrappers.scale_mul].info.kind == AFFINE  # * 0.5
    assert by_target[F.leaky_relu].fx.kwargs["negative_slope"] == 0.2  # moved out of args
    assert not any(n.op == "call_method" and n.target == "t" for n in gm.graph.nodes)  # W.t() folded in
    specs = {lg.node(n).fx.target: lg.conv_spec(n) for n in lg.weighted()}
    torch.testing.assert_close(specs[wrappers.linear_matmul].weight, gm.w.detach().T)
    torch.testing.assert_close(specs[wrappers.linear_matmul_t].weight, gm.v.detach())
    _same_output(gm, model, x)


def test_shape_branch_falls_back_to_torch_export_with_module_calls():
    model = ShapeBranch()
    x = rnd(1, 3, 8, 8)
    gm = trace(model, x)
    info = gm.meta["rgap_trace"]
    assert info["method"] == "torch.export"
    assert [a.split(":")[0] for a in info["failed_attempts"]] == ["torch.fx", "fx-leaf-modules", "fx-concrete-args"]
    assert info["collapsed_modules"] == 3
    lg = build_layer_graph(gm)
    paths = {lg.node(n).module_path: lg.node(n).info.name for n in lg.graph.nodes if lg.node(n).module_path}
    assert paths == {"conv": "Conv2d", "bn": "BatchNorm", "fc": "Linear"}
    (leaky,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.leaky_relu.default]
    assert leaky.kwargs == {"negative_slope": 0.3} and len(leaky.args) == 1
    assert not any(n.op == "call_module" and "guards" in str(n.target) for n in gm.graph.nodes)
    _same_output(gm, model, x)


def test_untraceable_model_fails_in_one_line_naming_every_attempt_and_the_line():
    with pytest.raises(AuditError) as err:
        trace(ValueBranch(), rnd(1, 3), file=HERE, name="ValueBranch")
    e = err.value
    line = _line(ValueBranch.forward, "if x.sum()")
    assert e.line == line and e.file == HERE
    text = e.one_line()
    assert "\n" not in text
    for method in ("torch.fx:", "fx-leaf-modules:", "fx-concrete-args:", "torch.export:"):
        assert method in text
    assert "data-dependent" in text and f"{HERE}:{line}" in text


def test_forward_failure_names_the_shape_and_the_user_line():
    with pytest.raises(AuditError) as err:
        trace(BadShape(), rnd(1, 2, 2), file=HERE)
    assert "forward failed on an input of shape (1, 2, 2)" in err.value.cause
    assert err.value.line == _line(BadShape.forward, "the failing call")


class Positional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 3))
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 2.0]))
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = x + self.pos.unsqueeze(0)  # a parameter expression: constant to the attacker
        h = self.fc(h) * self.mask  # a constant with a zero: not invertible
        return (h * h).sum(dim=1)  # a product of data with data


def test_constant_operands_and_data_marks():
    gm = trace(Positional(), rnd(2, 4, 3))
    marks = {n.name: n.meta["rgap_data"] for n in gm.graph.nodes}
    assert marks["x"] and not marks["pos"] and not marks["unsqueeze"]
    lg = build_layer_graph(gm)
    kinds = {lg.node(n).fx.target: lg.node(n).info.kind for n in lg.graph.nodes}
    assert kinds[wrappers.shift_add] == AFFINE
    muls = [n for n in gm.graph.nodes if n.target is wrappers.scale_mul]
    assert not muls  # neither the zero-containing mask nor h*h is an invertible scaling
    assert [lg.node(n).info.kind for n in lg.graph.nodes if lg.node(n).fx.target is operator.mul] == [MERGE, MERGE]


class Products(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.register_buffer("proj", torch.randn(3, 3))

    def forward(self, x):
        h = x @ (self.w * 2.0)  # a weight computed in forward
        return (h @ self.proj) @ (h.t() @ h)  # a constant matrix; then data @ data


def test_matmul_call_sites_are_classified_by_their_operands():
    gm = trace(Products(), rnd(2, 3))
    lg = build_layer_graph(gm)
    infos = {lg.node(n).fx.target: lg.node(n).info for n in lg.graph.nodes}
    assert infos[wrappers.computed_matmul].kind == UNKNOWN and "computed in forward" in infos[wrappers.computed_matmul].why
    assert infos[wrappers.constant_matmul].kind == "pool"
    assert infos[operator.matmul].kind == MERGE


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(dim=1))


def test_integer_inputs_stay_integer():
    ids = torch.randint(0, 20, (1, 5), generator=torch.Generator().manual_seed(0))
    gm = trace(Tokens(), ids)
    lg = build_layer_graph(gm)
    assert lg.node("emb").info.kind == EMBEDDING
    assert lg.node(lg.input_node).out_shape == (1, 5)
    assert gm(ids).shape == (1, 2)


def test_a_shared_module_is_one_node_per_use():
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(3, 3), act, nn.Linear(3, 3), act)
    gm = trace(model, rnd(1, 3))
    uses = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1"]
    assert len(uses) == 2
