"""Tests for clove_timm.optim: LARS against a per-parameter loop, state dicts, wrappers, parameter groups."""

import io

import pytest
import torch
from torch import nn

from clove_timm.optim import LARS, param_groups_for_lars


class _LoopLARS:
    """Plain per-parameter LARS written from the method doc (section 5): one Python loop, norms as Python floats.

    Runs in float64 on copies of the parameters, so it is an independent oracle for the foreach implementation.
    """

    def __init__(self, groups):
        self.groups = [
            {**group, "params": [p.detach().double().clone() for p in group["params"]], "bufs": {}} for group in groups
        ]

    def step(self, grads_per_group, lrs):
        for group, grads, lr in zip(self.groups, grads_per_group, lrs, strict=True):
            for i, (w, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                d = g.double().clone()
                if not group["lars_exclude"]:
                    d = d + group["weight_decay"] * w
                    w_norm = float(w.norm())
                    d_norm = float(d.norm())
                    ratio = 1.0
                    if w_norm > 0 and d_norm > 0:
                        ratio = group["trust_coefficient"] * w_norm / (d_norm + group["eps"])
                    d = d * ratio
                if i not in group["bufs"]:
                    group["bufs"][i] = d.clone()
                else:
                    group["bufs"][i] = group["momentum"] * group["bufs"][i] + d
                w -= lr * group["bufs"][i]


def _mixed_groups(dtype):
    gen = torch.Generator().manual_seed(0)
    regular = [
        nn.Parameter(torch.randn(4, 3, 3, 3, generator=gen, dtype=dtype)),  # conv weight
        nn.Parameter(torch.randn(5, 4, generator=gen, dtype=dtype)),  # linear weight
        nn.Parameter(torch.zeros(3, 3, dtype=dtype)),  # zero weight norm on the first step
    ]
    no_decay = [
        nn.Parameter(torch.randn(6, 2, generator=gen, dtype=dtype)),  # gets an all-zero gradient: zero grad norm
        nn.Parameter(torch.randn(2, 2, generator=gen, dtype=dtype)),  # gradient missing on some steps
    ]
    excluded = [
        nn.Parameter(torch.randn(5, generator=gen, dtype=dtype)),  # bias
        nn.Parameter(1.0 + 0.1 * torch.randn(4, generator=gen, dtype=dtype)),  # BN weight
    ]
    settings = [
        {"weight_decay": 0.05, "momentum": 0.9, "trust_coefficient": 1e-3, "eps": 1e-8, "lars_exclude": False},
        {"weight_decay": 0.0, "momentum": 0.8, "trust_coefficient": 1e-2, "eps": 1e-6, "lars_exclude": False},
        {"weight_decay": 0.0, "momentum": 0.9, "trust_coefficient": 1e-3, "eps": 1e-8, "lars_exclude": True},
    ]
    return [{"params": ps, **s} for ps, s in zip([regular, no_decay, excluded], settings, strict=True)]


def _grads_for_step(groups, step, gen):
    grads = []
    for gi, group in enumerate(groups):
        group_grads = []
        for pi, p in enumerate(group["params"]):
            if gi == 1 and pi == 0:
                group_grads.append(torch.zeros_like(p))
            elif gi == 1 and pi == 1 and step in (0, 2):
                group_grads.append(None)
            else:
                group_grads.append(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        grads.append(group_grads)
    return grads


def _assign_grads(groups, grads):
    for group, group_grads in zip(groups, grads, strict=True):
        for p, g in zip(group["params"], group_grads, strict=True):
            p.grad = None if g is None else g.clone()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_lars_matches_per_parameter_loop(dtype, tol):
    groups = _mixed_groups(dtype)
    oracle = _LoopLARS(groups)
    initial = [[p.detach().double().clone() for p in g["params"]] for g in groups]
    optimizer = LARS(groups, lr=1.0, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        lrs = [2.0 + 0.5 * step, 1.5, 0.3 / (step + 1)]  # set per group by the loop, as a schedule would
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        grads = _grads_for_step(groups, step, gen)
        _assign_grads(groups, grads)
        optimizer.step()
        oracle.step(grads, lrs)

    for gi, (group, ref_group) in enumerate(zip(optimizer.param_groups, oracle.groups, strict=True)):
        for pi, (p, ref) in enumerate(zip(group["params"], ref_group["params"], strict=True)):
            where = f"group {gi} param {pi}"
            torch.testing.assert_close(p.detach().double(), ref, rtol=tol, atol=tol, msg=where)
            # The trust-scaled displacements are ~1e-3 of the weights: compare them relatively as well.
            moved, ref_moved = p.detach().double() - initial[gi][pi], ref - initial[gi][pi]
            scale = ref_moved.abs().max().item()
            assert scale > 0 or (gi == 1 and pi == 0)
            torch.testing.assert_close(moved, ref_moved, rtol=0, atol=tol * (1 + ref.abs().max().item() + 100 * scale))
    # A zero gradient with no weight decay never moves its parameter.
    torch.testing.assert_close(groups[1]["params"][0].detach().double(), initial[1][0], rtol=0, atol=0)


def test_lars_hand_computed_single_steps():
    # ||w|| = 5, g = (0, 1), no weight decay: ratio 0.001 * 5 / (1 + 1e-8); first-step buf = scaled g; lr 2.
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    LARS([w], lr=2.0, weight_decay=0.0).step()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 2.0 * 0.005 / (1 + 1e-8)]], dtype=torch.float64))

    # Zero gradient, weight decay 0.1: d = (0.3, 0.4), ||d|| = 0.5, ratio 0.001 * 5 / 0.5 = 0.01; lr 1.
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    w.grad = torch.zeros(1, 2, dtype=torch.float64)
    LARS([w], lr=1.0, weight_decay=0.1, eps=0.0).step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]], dtype=torch.float64))

    # Zero weight: ratio 1, plain SGD step.
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    w.grad = torch.full((2, 2), 0.5, dtype=torch.float64)
    LARS([w], lr=0.1, weight_decay=0.1).step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.05, dtype=torch.float64))

    # Excluded group: no weight decay, no ratio; two steps of momentum 0.9: buf 0.5 then 0.9 * 0.5 + 0.5 = 0.95.
    b = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = LARS([{"params": [b], "lars_exclude": True}], lr=0.1, weight_decay=0.5)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    for _ in range(2):
        b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
        optimizer.step()
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.05 - 0.095, 2.0 - 0.05 - 0.095], dtype=torch.float64))


def test_lars_momentum_zero_and_mixed_dtypes_in_one_group():
    w32 = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    w64 = nn.Parameter(torch.tensor([[6.0, 8.0]], dtype=torch.float64))
    w32.grad = torch.tensor([[0.0, 2.0]])
    w64.grad = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    optimizer = LARS([w32, w64], lr=1.0, weight_decay=0.0, momentum=0.0, eps=0.0)
    optimizer.step()
    # ratios 0.001 * 5 / 2 and 0.001 * 10 / 2: steps of 0.0025 * 2 and 0.005 * 2 on the second entry.
    torch.testing.assert_close(w32.detach(), torch.tensor([[3.0, 3.995]]))
    torch.testing.assert_close(w64.detach(), torch.tensor([[6.0, 7.99]], dtype=torch.float64))
    assert "momentum_buffer" not in optimizer.state[w32]


def test_lars_leaves_grad_untouched():
    groups = _mixed_groups(torch.float32)
    optimizer = LARS(groups, lr=1.0, weight_decay=0.05)
    grads = _grads_for_step(groups, 1, torch.Generator().manual_seed(3))
    _assign_grads(groups, grads)
    before = [[None if p.grad is None else p.grad.clone() for p in g["params"]] for g in groups]
    for _ in range(2):  # the second step also exercises the momentum-buffer path
        optimizer.step()
    for group, group_before in zip(groups, before, strict=True):
        for p, g in zip(group["params"], group_before, strict=True):
            assert (p.grad is None) == (g is None)
            if g is not None:
                assert torch.equal(p.grad, g)
                assert not any(p.grad is buf for buf in optimizer.state[p].values())


def _tiny_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def _train_steps(model, optimizer, steps, start, lr_fn):
    gen = torch.Generator().manual_seed(100 + start)
    for step in range(start, start + steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_fn(step)
        x = torch.randn(2, 3, 6, 6, generator=gen)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_state_dict_round_trip_continues_identically():
    lr_fn = lambda step: 0.5 + 0.1 * step  # noqa: E731
    model = _tiny_model(0)
    optimizer = LARS(param_groups_for_lars(model, weight_decay=1e-2), lr=0.1, weight_decay=1e-2)
    _train_steps(model, optimizer, 3, 0, lr_fn)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = _tiny_model(1)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = LARS(param_groups_for_lars(resumed, weight_decay=1e-2), lr=0.1, weight_decay=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed_optimizer.param_groups[0]["lars_exclude"] is True
    assert len(resumed_optimizer.state) == len(list(model.parameters()))

    fresh = _tiny_model(1)
    fresh.load_state_dict(checkpoint["model"])
    fresh_optimizer = LARS(param_groups_for_lars(fresh, weight_decay=1e-2), lr=0.1, weight_decay=1e-2)

    for m, opt in ((model, optimizer), (resumed, resumed_optimizer), (fresh, fresh_optimizer)):
        _train_steps(m, opt, 3, 3, lr_fn)
    for (name, p), p_resumed in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, p_resumed), name
    # Without the momentum buffers the run diverges, so the equality above is not vacuous.
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def test_grad_scaler_and_closure():
    model, scaled_model = _tiny_model(0), _tiny_model(0)
    optimizer = LARS(param_groups_for_lars(model, weight_decay=1e-3), lr=1.0, weight_decay=1e-3)
    scaled_optimizer = LARS(param_groups_for_lars(scaled_model, weight_decay=1e-3), lr=1.0, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    for _ in range(2):

        def closure():
            optimizer.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        assert torch.is_tensor(loss) and loss.ndim == 0
        scaled_optimizer.zero_grad()
        scaler.scale(scaled_model(x).square().mean()).backward()
        scaler.step(scaled_optimizer)
        scaler.update()
    for p, q in zip(model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accelerated_optimizer():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = accelerate.Accelerator(cpu=True)
        model, plain_model = _tiny_model(0), _tiny_model(0)
        optimizer = LARS(param_groups_for_lars(model, weight_decay=1e-3), lr=1.0, weight_decay=1e-3)
        plain_optimizer = LARS(param_groups_for_lars(plain_model, weight_decay=1e-3), lr=1.0, weight_decay=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        gen = torch.Generator().manual_seed(7)
        for step in range(3):
            x = torch.randn(2, 3, 6, 6, generator=gen)
            for opt in (optimizer, plain_optimizer):
                for group in opt.param_groups:
                    group["lr"] = 0.5 * (step + 1)
            optimizer.zero_grad()
            accelerator.backward(model(x).square().mean())
            optimizer.step()
            plain_optimizer.zero_grad()
            plain_model(x).square().mean().backward()
            plain_optimizer.step()
        for p, q in zip(accelerator.unwrap_model(model).parameters(), plain_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        state = optimizer.state_dict()
        assert state["param_groups"][1]["lr"] == 1.5 and state["param_groups"][0]["lars_exclude"] is True
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _grouping_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model.register_parameter("temperature", nn.Parameter(torch.tensor(0.2)))
    model.register_parameter("frozen", nn.Parameter(torch.ones(3, 3), requires_grad=False))
    return model


def test_param_groups_for_lars_split():
    model = _grouping_model()
    excluded, regular = param_groups_for_lars(model, 2e-5)
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert excluded["lars_exclude"] is True and excluded["weight_decay"] == 0.0
    assert regular["lars_exclude"] is False and regular["weight_decay"] == 2e-5
    assert ids(excluded["params"]) == ids([model[1].weight, model[1].bias, model[3].bias, model.temperature])
    assert ids(regular["params"]) == ids([model[0].weight, model[3].weight])

    excluded, regular = param_groups_for_lars(model.named_parameters(), 1e-4, skip_names=["3.weight"])
    assert id(model[3].weight) in ids(excluded["params"])
    assert ids(regular["params"]) == ids([model[0].weight])

    optimizer = LARS(param_groups_for_lars(model, 1e-4), lr=1.0, weight_decay=1e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 1e-4]


def test_param_groups_for_lars_bad_inputs():
    model = _grouping_model()
    with pytest.raises(ValueError, match=r"skip_names not found.*'nope'"):
        param_groups_for_lars(model, 1e-4, skip_names=["nope"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups_for_lars(nn.Linear(2, 2).requires_grad_(False), 1e-4)
    with pytest.raises(TypeError, match=r"\(name, parameter\) pairs"):
        param_groups_for_lars(model.parameters(), 1e-4)
    with pytest.raises(TypeError, match="not a tensor"):
        param_groups_for_lars([("w", 1.0)], 1e-4)
    with pytest.raises(ValueError, match="appears twice"):
        param_groups_for_lars([("w", model[0].weight), ("w", model[3].weight)], 1e-4)
    with pytest.raises(ValueError, match="weight_decay must lie in"):
        param_groups_for_lars(model, -1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -0.1}, ValueError, "lr must lie in"),
        ({"lr": float("nan")}, ValueError, "lr must lie in"),
        ({"weight_decay": -1e-5}, ValueError, "weight_decay must lie in"),
        ({"momentum": 1.0}, ValueError, r"momentum must lie in \[0.0, 1.0\)"),
        ({"trust_coefficient": float("inf")}, ValueError, "trust_coefficient"),
        ({"eps": -1e-8}, ValueError, "eps must lie in"),
        ({"eps": "1e-8"}, TypeError, "eps must be a real number"),
    ],
)
def test_lars_bad_hyperparameters(kwargs, error, match):
    args = {"lr": 1.0, "weight_decay": 2e-5, **kwargs}
    with pytest.raises(error, match=match):
        LARS([nn.Parameter(torch.ones(2, 2))], **args)


def test_lars_bad_groups_and_gradients():
    with pytest.raises(TypeError, match="weight_decay"):
        LARS([nn.Parameter(torch.ones(2, 2))], lr=1.0)  # weight decay has no default
    with pytest.raises(ValueError, match="lars_exclude=True takes no weight decay"):
        LARS(
            [{"params": [nn.Parameter(torch.ones(2))], "lars_exclude": True, "weight_decay": 1e-4}],
            lr=1.0,
            weight_decay=0,
        )
    with pytest.raises(TypeError, match="lars_exclude must be a bool"):
        LARS([{"params": [nn.Parameter(torch.ones(2))], "lars_exclude": 1}], lr=1.0, weight_decay=0)
    with pytest.raises(ValueError, match="complex parameters"):
        LARS([nn.Parameter(torch.ones(2, dtype=torch.complex64))], lr=1.0, weight_decay=0)

    w = nn.Parameter(torch.ones(2, 2))
    w.grad = torch.ones(2, 2)
    optimizer = LARS([w], lr=1.0, weight_decay=0)
    with pytest.raises(ValueError, match="momentum must lie in"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.ones(2, 2))], "momentum": -0.5})
    assert len(optimizer.param_groups) == 1  # the rejected group was not kept
    optimizer.param_groups[0]["lr"] = float("nan")  # a broken schedule
    with pytest.raises(ValueError, match="lr must lie in"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = 1.0
    del optimizer.param_groups[0]["trust_coefficient"]
    with pytest.raises(KeyError, match="trust_coefficient"):
        optimizer.step()

    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    optimizer = LARS(embedding.parameters(), lr=1.0, weight_decay=0)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()
