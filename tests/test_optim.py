"""Host AdamW, clipping coefficient and LR schedule against torch's own."""

import math

import pytest
import torch

from megastream.config import TrainConfig
from megastream import ops
from megastream.optim import AdamWHyper, OptimizerWorker, clip_coef, lr_at, sr_key


@pytest.mark.parametrize("use_ext", [True, False], ids=["cpp", "fallback"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_full_precision_adamw_matches_torch(wd, use_ext):
    """fp32 master + fp32 states: torch.optim.AdamW to rounding (torch's kernels fuse multiply-adds)."""
    g = torch.Generator().manual_seed(0)
    n, n_decay = 1001, 700  # decayed 2-D weights first, then norms/biases
    p0 = torch.randn(n, generator=g)
    ref = [p0[:n_decay].clone().requires_grad_(), p0[n_decay:].clone().requires_grad_()]
    opt = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": wd}, {"params": [ref[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 6):
        grad = torch.randn(n, generator=g)
        ref[0].grad, ref[1].grad = grad[:n_decay].clone(), grad[n_decay:].clone()
        lr = 1e-2 / step
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ops.adamw_step(p, grad, m, v, n_decay=n_decay, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd,
                       step=step, use_ext=use_ext)
    torch.testing.assert_close(p, torch.cat([ref[0].detach(), ref[1].detach()]), rtol=1e-6, atol=1e-7)


def test_sr_key_depends_on_seed_step_and_unit():
    keys = {sr_key(s, t, u) for s in (0, 1) for t in (1, 2) for u in (0, 5)}
    assert len(keys) == 8 and all(0 <= k < 2**32 for k in keys)
    assert sr_key(3, 4, 5) == sr_key(3, 4, 5)


def test_clip_coef_matches_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    params = [torch.zeros(s, requires_grad=True) for s in (7, 13)]
    for prm in params:
        prm.grad = torch.randn(prm.shape, generator=g) * 3
    grads = [prm.grad.clone() for prm in params]
    total = float(torch.nn.utils.clip_grad_norm_(params, 0.5))
    coef = clip_coef(total, 0.5)
    assert coef < 1
    for prm, grad in zip(params, grads):
        torch.testing.assert_close(prm.grad, grad * coef, rtol=0, atol=0)
    assert clip_coef(0.1, 0.5) == 1.0
    assert clip_coef(100.0, 0.0) == 1.0  # 0 disables


def test_lr_schedules():
    t = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr=0.1, schedule="cosine")
    assert [lr_at(s, t) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, t) == pytest.approx(1.0)
    assert lr_at(6, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(9, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    lin = TrainConfig(steps=10, lr=1.0, warmup_steps=0, min_lr=0.0, schedule="linear")
    assert [lr_at(s, lin) for s in (0, 5)] == [1.0, 0.5]
    const = TrainConfig(steps=10, lr=0.3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, const) for s in range(10)} == {0.3}


def test_worker_runs_in_order_and_surfaces_errors():
    seen = []

    def update(u, hyper):
        if u == 3:
            raise ValueError("boom")
        seen.append(u)

    w = OptimizerWorker(update)
    from megastream.engine.streams import DONE
    h = AdamWHyper(1e-3, 0.9, 0.95, 1e-8, 0.0, 1)
    for u in (0, 1, 2):
        w.submit(u, DONE, h)
    w.wait(2)
    assert seen == [0, 1, 2]
    w.submit(3, DONE, h)
    with pytest.raises(RuntimeError, match="optimizer thread failed"):
        w.wait(3)
    w.close()
