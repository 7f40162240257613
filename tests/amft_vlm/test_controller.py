"""The mu controller: the meta-gradient against finite differences, its sign, the entropy term, state."""

import pytest
import torch

from amft_vlm.controller import MuController, meta_gradient


def tensor(values):
    """Double precision keeps the finite differences clean."""
    return torch.tensor(values, dtype=torch.float64)


def losses(theta):
    """A small smooth problem: two different training losses and a validation utility."""
    l_sft = 0.5 * ((theta - tensor([1.0, -2.0, 0.5, 3.0, 0.0])) ** 2).sum()
    l_rl = (torch.cos(theta) * tensor([0.3, 1.0, -2.0, 0.7, 1.5])).sum() + 0.1 * (theta**4).sum()
    return l_sft, l_rl


def utility(theta):
    return -((theta - tensor([0.5, -1.0, 1.0, 2.0, -0.5])) ** 2).sum() + torch.sin(theta).sum()


def grad(fn, theta):
    theta = theta.detach().requires_grad_(True)
    return torch.autograd.grad(fn(theta), theta)[0]


@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_meta_gradient_matches_finite_differences(mu, alpha):
    theta = tensor([0.2, -0.4, 1.1, 0.3, -0.8])
    g_sft = grad(lambda t: losses(t)[0], theta)
    g_rl = grad(lambda t: losses(t)[1], theta)

    def lookahead(m):
        return theta - alpha * ((1 - m) * g_rl + m * g_sft)

    grad_u = grad(utility, lookahead(mu))
    computed = meta_gradient([grad_u], [g_sft], [g_rl], alpha=alpha, normalize=False)
    eps = 1e-4
    finite = (utility(lookahead(mu + eps)) - utility(lookahead(mu - eps))).item() / (2 * eps)
    assert computed == pytest.approx(finite, rel=0.05)
    assert abs(computed) > 1e-6  # the problem is not degenerate


def test_normalised_meta_gradient_keeps_the_sign_and_is_a_cosine():
    grad_u, g_sft, g_rl = tensor([1.0, 2.0]), tensor([-3.0, 0.5]), tensor([0.2, 0.1])
    raw = meta_gradient([grad_u], [g_sft], [g_rl], alpha=1e-6, normalize=False)
    cosine = meta_gradient([grad_u], [g_sft], [g_rl], alpha=1e-6, normalize=True)
    assert (raw > 0) == (cosine > 0) and -1.0 <= cosine <= 1.0
    expected = -torch.dot(grad_u, g_sft - g_rl) / (grad_u.norm() * (g_sft - g_rl).norm())
    assert cosine == pytest.approx(expected.item())
    assert meta_gradient([None], [g_sft], [g_rl], alpha=1.0, normalize=True) == 0.0


def controller_after_warmup(**kwargs):
    controller = MuController(mu_init=0.5, warmup_steps=0, **kwargs)
    controller.set_target_entropy(1.0)
    return controller


@pytest.mark.parametrize("normalize", [False, True])
def test_mu_rises_when_only_sft_helps_and_falls_when_only_rl_helps(normalize):
    g_sft, g_rl = tensor([1.0, 0.0, 0.0]), tensor([0.0, 1.0, 0.0])
    # U improves along the SFT descent direction only: grad U = -g_SFT.
    sft_helps = meta_gradient([-g_sft], [g_sft], [g_rl], alpha=0.1, normalize=normalize)
    rl_helps = meta_gradient([-g_rl], [g_sft], [g_rl], alpha=0.1, normalize=normalize)
    up = controller_after_warmup(use_entropy=False, eta_mu=0.1)
    down = controller_after_warmup(use_entropy=False, eta_mu=0.1)
    assert up.update(entropy=1.0, meta_signal=sft_helps) > 0.5
    assert down.update(entropy=1.0, meta_signal=rl_helps) < 0.5


@pytest.mark.parametrize(("sign", "entropy", "direction"), [(1, 0.5, 1), (1, 1.5, -1), (-1, 0.5, -1), (-1, 1.5, 1)])
def test_entropy_term_direction_follows_the_sign_setting(sign, entropy, direction):
    controller = controller_after_warmup(entropy_sign=sign, eta_h=0.1, use_meta=False)
    mu = controller.update(entropy=entropy)
    assert (mu - 0.5) * direction > 0
    assert controller.state.last_entropy_term == pytest.approx(0.1 * sign * (1.0 - entropy))
    assert controller.state.last_meta_term == 0.0


def test_mu_is_clipped():
    controller = controller_after_warmup(eta_h=10.0, use_meta=False)
    assert controller.update(entropy=-100.0) == 0.95
    assert controller.update(entropy=100.0) == 0.05


def test_warmup_schedule_and_meta_interval():
    controller = MuController(mu_init=0.8, warmup_steps=3, meta_interval=4)
    assert [controller.mu_for_step(s) for s in range(5)] == [1.0, 1.0, 1.0, 0.8, 0.8]
    assert [s for s in range(15) if controller.wants_meta_gradient(s)] == [3, 7, 11]
    assert not MuController(use_meta=False, warmup_steps=0).wants_meta_gradient(0)
    with pytest.raises(RuntimeError, match="set_target_entropy"):
        controller.update(entropy=1.0)


def test_state_round_trip():
    controller = controller_after_warmup(eta_h=0.1)
    controller.update(entropy=0.2, meta_signal=0.3)
    restored = MuController(mu_init=0.5, warmup_steps=0)
    restored.load_state_dict(controller.state_dict())
    assert restored.state == controller.state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"mu_min": 0.6, "mu_max": 0.4}, "mu_min"), ({"mu_init": 0.99}, "mu_init"), ({"entropy_sign": 0}, "entropy_sign"), ({"meta_interval": 0}, "meta_interval")],
)
def test_invalid_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MuController(**kwargs)
