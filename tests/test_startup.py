"""What issue 15 changed for speed changes no number, and a run imports only what it needs.

* Entrywise links push tangents through their steps' own derivatives instead of forward-mode AD, and
  pull rows back with plain autograd instead of torch.func.vjp: checked against torch.func.jvp / vjp
  (the previous implementation) on the links of the example models, including the zero pattern that
  decides the known inputs.
* The input layer's null basis is not computed (nobody reads it): its rank, bounds, deficit and
  `undetermined` are those of the same system ranked with the basis (rank.layer_rank, want_null=True),
  on models whose input layer is full rank and deficient.
* Imports, in fresh processes: `rgap-audit rules` and a run served from the cache import no torch; a
  static audit imports neither the attack, scipy.optimize, PIL, matplotlib, einops, torch._dynamo nor sympy,
  also on a residual net with BatchNorm whose joint segments are linearised by jvp (torch.func's reverse
  mode and batch_norm's forward AD load torch._dynamo, about 2 s): ConvSpec.weight_grad in closed form and
  eval BatchNorm as a depthwise 1x1 convolution (OpInfo.evaluate), both checked against autograd and the
  module itself, also under vmap of jvp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rgap_audit.analysis import audit_model
from rgap_audit.links import above
from rgap_audit.loader import load_models
from rgap_audit.options import AuditOptions
from rgap_audit.rank import layer_rank

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


class CifarCNN(nn.Module):
    """The small CIFAR CNN of federated-learning tutorials (ReLU, max-pool): its input layer is deficient."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Permuted(nn.Module):
    """Links with permutations and reshapes between elementwise steps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 6 * 6, 3, bias=False)

    def forward(self, x):
        y = torch.tanh(self.conv(x)).permute(0, 2, 3, 1)
        return self.fc(F.leaky_relu(y.flatten(1), 0.1) * 2.0)


def _examples():
    out = [(m.name, m) for m in load_models(str(EXAMPLES / "paper_nets.py"), ["CNN6", "FCN3"], AuditOptions())]
    out += [(m.name, m) for m in load_models(str(EXAMPLES / "dlg_lenet.py"), ["LeNet"], AuditOptions())]
    out += [(m.name, m) for m in load_models(str(EXAMPLES / "relu_cnn.py"), None, AuditOptions())]
    return out


def _models():
    yield from _examples()
    torch.manual_seed(0)
    yield "CifarCNN", (CifarCNN(), (3, 32, 32))
    yield "Permuted", (Permuted(), (2, 6, 6))


@pytest.mark.parametrize("name, model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_link_products_match_torch_func(name, model):
    if isinstance(model, tuple):
        checked = audit_model(model[0], model[1])
    else:
        checked = audit_model(model.module, model.input_shape, loss=model.loss)
    inst = checked.instance
    lg = inst.graph
    gen = torch.Generator().manual_seed(1)
    seen = 0
    for lower in lg.weighted():
        link = above(lg, lower, inst.env, {})
        if not link.steps:
            continue
        z0 = inst.values[lower].detach().to(torch.float64)
        fn = link.fn()
        end = fn(z0)
        ts = torch.randn(5, *z0.shape, generator=gen, dtype=torch.float64)
        ref = torch.stack([torch.func.jvp(fn, (z0,), (t,))[1] for t in ts])
        got = link.jvp_batch(z0)(ts)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14 * float(ref.abs().max().clamp_min(1)))
        assert torch.equal(got == 0, ref == 0)
        vs = torch.randn(4, *end.shape, generator=gen, dtype=torch.float64)
        pull = torch.func.vjp(fn, z0)[1]
        ref_v = torch.stack([pull(v)[0] for v in vs])
        assert torch.allclose(link.vjp_batch(z0, vs), ref_v, rtol=1e-12, atol=1e-14 * float(ref_v.abs().max().clamp_min(1)))
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        t = torch.randn(z0.shape, generator=g2, dtype=z0.dtype)
        assert torch.equal(link.constant_entries(z0, g1), torch.func.jvp(fn, (z0,), (t,))[1] == 0)
        seen += 1
    assert seen > 0


@pytest.mark.parametrize("make, shape, deficient", [(CifarCNN, (3, 32, 32), True), ("CNN6", (3, 32, 32), False), ("LeNet", (3, 32, 32), False)])
def test_input_layer_without_basis_ranks_as_with_it(make, shape, deficient):
    if isinstance(make, str):
        (loaded,) = load_models(str(EXAMPLES / ("paper_nets.py" if make == "CNN6" else "dlg_lenet.py")), [make], AuditOptions())
        checked = audit_model(loaded.module, shape, loss=loaded.loss)
    else:
        torch.manual_seed(0)
        checked = audit_model(make(), shape)
    lg = checked.instance.graph
    first = lg.weighted()[-1]  # the walk's last layer: the one reading the model input
    system = checked.systems[first]
    assert system.result.null_basis is None  # not computed
    full = layer_rank(system.spec, system.k, system.forward, known=system.known, want_null=True)  # type: ignore[arg-type]
    got = system.result
    assert (got.rank, got.rank_lower, got.rank_upper, got.deficit, got.rank_grad) == (
        full.rank, full.rank_lower, full.rank_upper, full.deficit, full.rank_grad,
    )
    assert (full.deficit > 0) == deficient
    assert full.null_basis is not None  # so the basis would have been kept: no carried bounds either way
    rec = next(r for r in checked.report.layers if r.node == first)
    assert rec.undetermined is None and rec.deficit == full.deficit


def _python(code: str, tmp_path: Path, *, cache: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RGAP_AUDIT_NO_CACHE", None)
    if not cache:
        env["RGAP_AUDIT_NO_CACHE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import io, json, sys, contextlib
from rgap_audit.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main({argv!r})
mods = ["torch", "numpy", "scipy", "scipy.optimize", "networkx", "PIL", "matplotlib", "einops", "sympy",
        "torch._dynamo", "rgap_audit.attack", "rgap_audit.verify", "rgap_audit.analysis"]
print(json.dumps({{"code": code, "loaded": [m for m in mods if m in sys.modules]}}))
"""


def test_rules_command_and_cached_runs_import_no_torch(tmp_path):
    got = _python(PROBE.format(argv=["rules"]), tmp_path)
    assert got["code"] == 0 and "torch" not in got["loaded"] and "numpy" not in got["loaded"]
    target = f"{EXAMPLES / 'paper_nets.py'}:FCN3"
    argv = [target, "--format", "concise", "--cache-dir", str(tmp_path / "c")]
    cold = _python(PROBE.format(argv=argv), tmp_path, cache=True)
    assert "torch" in cold["loaded"]
    for absent in ("scipy.optimize", "PIL", "matplotlib", "einops", "sympy", "torch._dynamo", "rgap_audit.attack", "rgap_audit.verify"):
        assert absent not in cold["loaded"], absent
    cached = _python(PROBE.format(argv=argv), tmp_path, cache=True)
    assert cached["code"] == cold["code"] == 1
    assert not {"torch", "numpy", "scipy", "networkx", "rgap_audit.analysis"} & set(cached["loaded"])


def test_residual_batchnorm_audit_does_not_load_dynamo(tmp_path):
    target = f"{EXAMPLES / 'resnet_bn.py'}:ResNet-tiny"
    got = _python(PROBE.format(argv=[target, "--format", "concise"]), tmp_path)
    assert got["code"] in (0, 1)
    assert "torch._dynamo" not in got["loaded"]


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(7, 5), (7,)),
        (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (4, 9)),
        (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=4), (4, 9, 9)),
        (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (2, 4, 5, 4)),
    ],
)
def test_weight_grad_in_closed_form_equals_autograd(make, shape):
    from rgap_audit.convspec import ConvSpec

    torch.manual_seed(0)
    layer = make().double()
    spec = ConvSpec.from_module(layer, shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    k = torch.randn(3, *spec.out_shape, dtype=torch.float64)
    w = layer.weight.detach().clone().requires_grad_(True)
    conv = {1: F.linear, 2: F.conv1d, 3: F.conv2d, 4: F.conv3d}[len(shape)]
    args = () if len(shape) == 1 else (None, layer.stride, layer.padding, layer.dilation, layer.groups)
    z = conv(x, w, *args)
    (ref,) = torch.autograd.grad((z * k).sum(), w)
    assert torch.allclose(spec.weight_grad(x, k), ref, atol=1e-12)
    # linear in x, and composes with vmap of jvp (the joint segments' columns)
    t = torch.randn(4, 3, *shape, dtype=torch.float64)
    cols = torch.func.vmap(lambda v: torch.func.jvp(lambda u: spec.weight_grad(u, k), (x,), (v,))[1])(t)
    assert torch.allclose(cols, torch.stack([spec.weight_grad(v, k) for v in t]), atol=1e-12)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.BatchNorm1d(5), (4, 5)),
        (lambda: nn.BatchNorm1d(5, affine=False), (4, 5, 6)),
        (lambda: nn.BatchNorm2d(3), (2, 3, 4, 4)),
        (lambda: nn.BatchNorm3d(2), (2, 2, 3, 3, 3)),
    ],
)
def test_batchnorm_evaluate_equals_the_module(make, shape):
    from rgap_audit.ops import lookup

    torch.manual_seed(1)
    bn = make().double()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    bn.eval()
    info = lookup(type(bn), bn)
    assert info.evaluate is not None
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.allclose(info.evaluate(bn, x), bn(x), atol=1e-12)
    t = torch.randn(3, *shape, dtype=torch.float64)
    got = torch.func.vmap(lambda v: torch.func.jvp(lambda u: info.evaluate(bn, u), (x,), (v,))[1])(t)
    ref = torch.stack([torch.func.jvp(bn, (x,), (v,))[1] for v in t])
    assert torch.allclose(got, ref, atol=1e-12)
    bn.train()  # batch statistics: the module's own call
    assert torch.allclose(info.evaluate(bn, x), bn(x), atol=1e-12)
