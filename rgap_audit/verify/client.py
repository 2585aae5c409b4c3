"""The client --verify attacks: the audited instance, or the same traced graph on another input
(--input) or with other weights (--weights). Bad input is an AuditError with the cause."""

from __future__ import annotations

import copy

import torch

from rgap_audit.errors import AuditError
from rgap_audit.instance import Instance
from rgap_audit.losses import make_labels
from rgap_audit.verify.inputs import load_batch_input, load_input, load_weights


def client_instance(inst: Instance, input: str | None, weights: str | None) -> Instance:
    """The instance whose shared gradient the attack receives.

    Without --input and --weights it is the audited instance itself (same seeded input and labels).
    --weights is matched against the user's model, then loaded into the traced graph. --input replaces
    the input; its labels are drawn from a generator seeded with the audit's seed.
    """
    name = inst.loaded.name
    client = inst
    if weights:
        model = copy.deepcopy(inst.loaded.module)
        state = load_weights(model, weights, name)
        client = client.with_weights(state)
    if input:
        if inst.batch > 1:
            x = load_batch_input(input, inst.input_shape, inst.batch, name)
        else:
            x = load_input(input, inst.input_shape, name)
        if not torch.isfinite(x).all():
            raise AuditError("--input contains NaN or Inf", model=name)
        gen = torch.Generator().manual_seed(int(inst.seed))
        labels = make_labels(inst.loss, x.shape[0], inst.out_features, gen)
        try:
            client = client.replay(x, labels)
        except Exception as exc:
            raise AuditError(
                f"--verify: the model fails on an input of shape {tuple(x.shape)}: {type(exc).__name__}: {exc}", model=name
            ) from exc
    bad = [n for n, g in client.param_grads.items() if not torch.isfinite(g).all()]
    if bad:
        raise AuditError(f"--verify: the client's gradient has NaN or Inf in {', '.join(bad[:3])}", model=name)
    return client
