"""Rows an op's own parameter gradient gives on its input (BatchNorm's dL/dgamma), measured against the
weighted layer below: redundant when they are per-channel multiples of that layer's dL/dz."""

from __future__ import annotations

from rgap_audit import ops
from rgap_audit.instance import Instance
from rgap_audit.links import Link, make_step
from rgap_audit.records import LayerRecord, ParamRowsRecord

REDUNDANT_TOL = 1e-9  # relative residual of the per-channel proportionality up to which the rows add no rank


def _elementwise_link(inst: Instance, name: str) -> Link:
    """From the op's data input down through elementwise single-consumer ops to what feeds them."""
    lg = inst.graph
    cur = lg.data_args(name)[0]
    nodes: list[str] = []
    while lg.node(cur).info.elementwise:
        if len(lg.consumers(cur)) != 1:
            break
        nodes.insert(0, cur)
        cur = lg.data_args(cur)[0]
    link = Link(cur, name)
    src = cur
    for n in nodes:
        link.steps.append(make_step(lg, n, src, inst.env))
        src = n
    return link


def measure_param_rows(inst: Instance, name: str, rec: LayerRecord, warnings: list[str]) -> None:
    """An op's own parameter rows (BatchNorm: dL/dgamma_c = sum_p k_y[c,p] (a[c,p] - mu_c) / sigma_c, one
    linear row per channel on its input a). When a comes from a weighted layer through elementwise ops,
    the row on z is J^T (k_y / sigma) restricted to channel c, which equals k_z[c] / gamma_c, and
    sum_p k_z[c,p] z[c,p] = <dL/dW[c], W[c]> is a combination of that layer's gradient rows: the
    rows add no rank. Measured here on the instance (proportionality per channel); otherwise the
    rows are reported as constraints the analysis does not use."""
    lg = inst.graph
    gn = lg.node(name)
    info, module = gn.info, gn.module
    got = info.param_rows(module, inst.grads[name]) if (module is not None and info.param_rows is not None) else None
    if got is None:
        return
    what = got.parameter
    channels = int(got.rows.shape[1])
    rec.param_rows = ParamRowsRecord(parameter=what, rows=channels)
    unused = (
        f"; its {what} gradient gives {channels} linear rows on its input that this analysis does not use "
        f"(the attacker may have up to {channels} more constraints than counted)"
    )
    link = _elementwise_link(inst, name)
    assert link.lower is not None
    layer = lg.node(link.lower)
    below = layer.module
    frozen = below is not None and getattr(below, "weight", None) is not None and not below.weight.requires_grad
    if layer.info.kind != ops.LAYER or len(lg.consumers(link.lower)) != 1 or frozen:
        why = "not fed by a weighted layer through elementwise ops" if not frozen else f"the layer below ({link.lower}) is frozen"
        rec.param_rows.redundant = False
        rec.reason += unused + f" ({why})"
        warnings.append(f"{name} ({info.name}): {channels} {what}-gradient rows not used as constraints ({why})")
        return
    e = got.rows
    cur = link.lower
    z0 = inst.values[cur]
    u = link.vjp(z0, e) if link.steps else e
    k_z = inst.grads[cur].detach().reshape(u.shape)
    u_c = u.transpose(0, 1).reshape(u.shape[1], -1)
    k_c = k_z.transpose(0, 1).reshape(u.shape[1], -1)
    alpha = (u_c * k_c).sum(1, keepdim=True) / (k_c * k_c).sum(1, keepdim=True).clamp_min(1e-300)
    resid = float(((u_c - alpha * k_c).norm(dim=1) / u_c.norm(dim=1).clamp_min(1e-300)).max()) if u_c.numel() else 0.0
    rec.param_rows.residual = resid
    if resid <= REDUNDANT_TOL:
        rec.param_rows.redundant = True
        rec.reason += (
            f"; its {what} gradient's {channels} rows, linearised on {cur}'s output z, equal k_z[c] / gamma_c "
            f"(measured residual {resid:.1e}), combinations of {cur}'s gradient rows "
            "(sum_p k_z[c,p] z[c,p] = <dL/dW[c], W[c]>): they add no rank"
        )
    else:
        rec.param_rows.redundant = False
        rec.reason += unused + f" (not proportional to {cur}'s dL/dz per channel: residual {resid:.1e})"
        warnings.append(f"{name} ({info.name}): {channels} {what}-gradient rows not used as constraints")
