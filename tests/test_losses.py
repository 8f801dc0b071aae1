"""utils/losses.py against independent plain-Python computations on hand-made numbers (no model)."""
import math

import pytest
import torch

from utils.errors import UsageError
from utils.loss_config import LossConfigError, needs_reference, resolve_loss_type
from utils.losses import pair_seed, preference_loss, preference_metrics, sampo_masks, sequence_logps, sft_loss_sum

# Three pairs of hand-made per-pair summed log-probs and response lengths.
PC, PR = [-12.0, -30.5, -4.2], [-15.0, -22.0, -9.9]
RC, RR = [-13.5, -29.0, -5.0], [-14.0, -25.0, -9.0]
LC, LR = [4, 10, 2], [6, 5, 3]


def t(values, **kw):
    return torch.tensor(values, dtype=torch.float64, **kw)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def run(loss_type, **kw):
    return preference_loss(t(PC), t(PR), t(RC), t(RR), torch.tensor(LC), torch.tensor(LR), loss_type=loss_type, **kw)


def close(tensor, expected, tol=1e-10):
    assert tensor.tolist() == pytest.approx(expected, abs=tol)


# --- sequence_logps / sft ---------------------------------------------------------------------------------

def test_sequence_logps_matches_python_loop_and_is_differentiable():
    values, lengths = [-0.5, -1.25, -2.0, -0.1, -3.0, -0.75, -0.2], [2, 0, 4, 1]
    expected, start = [], 0
    for n in lengths:
        expected.append(sum(values[start:start + n]))
        start += n
    tok = t(values, requires_grad=True)
    out = sequence_logps(tok, torch.tensor(lengths))
    close(out, expected)
    (out * t([1.0, 2.0, 3.0, 4.0])).sum().backward()
    close(tok.grad, [1, 1, 3, 3, 3, 3, 4])


def test_sequence_logps_mask_and_length_check():
    tok = t([-1.0, -2.0, -3.0, -4.0])
    mask = torch.tensor([True, False, False, True])
    close(sequence_logps(tok, torch.tensor([3, 1]), mask), [-1.0, -4.0])
    with pytest.raises(ValueError):
        sequence_logps(tok, torch.tensor([3, 2]))


def test_sft_loss_sum_is_summed_nll():
    probs = [0.5, 0.25, 0.9]
    tok = t([math.log(p) for p in probs], requires_grad=True)
    loss = sft_loss_sum(tok)
    assert loss.item() == pytest.approx(sum(-math.log(p) for p in probs))
    loss.backward()
    close(tok.grad, [-1.0, -1.0, -1.0])


# --- DPO / cDPO ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_matches_formula(eps):
    beta = 0.2
    out = run("sigmoid", beta=beta, label_smoothing=eps)
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        expected.append(-logsig(beta * h) * (1 - eps) - logsig(-beta * h) * eps)
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    close(out.rejected_rewards, [beta * (pr - rr) for pr, rr in zip(PR, RR)])
    close(out.logits, [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)])
    assert not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "ln_dpo", "sampo"])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_policy_equal_reference_gives_ln2_and_zero_rewards(loss_type, eps):
    out = preference_loss(t(PC), t(PR), t(PC), t(PR), torch.tensor(LC), torch.tensor(LR),
                          loss_type=loss_type, beta=0.5, label_smoothing=eps)
    close(out.losses, [math.log(2)] * 3)
    close(out.chosen_rewards, [0.0] * 3)
    close(out.rejected_rewards, [0.0] * 3)


def test_label_smoothing_half_is_symmetric_and_grows_loss_of_confident_pairs():
    plain, smoothed = run("sigmoid", beta=1.0).losses, run("sigmoid", beta=1.0, label_smoothing=0.2).losses
    flipped = preference_loss(t(PR), t(PC), t(RR), t(RC), loss_type="sigmoid", beta=1.0, label_smoothing=0.5)
    close(run("sigmoid", beta=1.0, label_smoothing=0.5).losses, flipped.losses.tolist())
    h = t([(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)])
    assert bool(((smoothed > plain) == (h > 0)).all())  # smoothing penalises confidence in the label
    close(smoothed - plain, (0.2 * h).tolist())  # eps * (logsig(x) - logsig(-x)) = eps * x


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_sigmoid_gradient_matches_analytic_formula(eps):
    beta = 0.3
    pc, pr = t(PC, requires_grad=True), t(PR, requires_grad=True)
    out = preference_loss(pc, pr, t(RC), t(RR), loss_type="sigmoid", beta=beta, label_smoothing=eps)
    out.losses.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = []
    for c, r, rc, rr in zip(PC, PR, RC, RR):
        h = (c - rc) - (r - rr)
        expected.append(-beta * sig(-beta * h) * (1 - eps) + beta * sig(beta * h) * eps)
    close(pc.grad, expected)
    close(pr.grad, [-g for g in expected])


# --- IPO, length-normalised DPO, SimPO -----------------------------------------------------------------------

def test_ipo_uses_per_token_averaged_logps():
    beta = 0.1
    out = run("ipo", beta=beta)
    expected = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        h = (pc - rc) / lc - (pr - rr) / lr
        expected.append((h - 1 / (2 * beta)) ** 2)
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * (pc - rc) / lc for pc, rc, lc in zip(PC, RC, LC)])
    # Summed (un-averaged) log-ratios give a different value: the averaging is really applied.
    h_sum = (PC[1] - RC[1]) - (PR[1] - RR[1])
    assert out.losses[1].item() != pytest.approx((h_sum - 1 / (2 * beta)) ** 2)


def test_ln_dpo_divides_each_log_ratio_by_its_length():
    beta, eps = 0.7, 0.05
    out = run("ln_dpo", beta=beta, label_smoothing=eps)
    expected = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        h = (pc - rc) / lc - (pr - rr) / lr
        expected.append(-logsig(beta * h) * (1 - eps) - logsig(-beta * h) * eps)
    close(out.losses, expected)
    close(out.rejected_rewards, [beta * (pr - rr) / lr for pr, rr, lr in zip(PR, RR, LR)])


@pytest.mark.parametrize("gamma,eps", [(0.0, 0.0), (0.8, 0.0), (0.8, 0.1)])
def test_simpo_matches_formula_without_reference(gamma, eps):
    beta = 2.0
    out = preference_loss(t(PC), t(PR), None, None, torch.tensor(LC), torch.tensor(LR), loss_type="simpo",
                          beta=beta, simpo_gamma=gamma, label_smoothing=eps)
    expected = []
    for pc, pr, lc, lr in zip(PC, PR, LC, LR):
        x = beta * (pc / lc - pr / lr) - gamma
        expected.append(-logsig(x) * (1 - eps) - logsig(-x) * eps)
    close(out.losses, expected)
    close(out.chosen_rewards, [beta * pc / lc for pc, lc in zip(PC, LC)])


def test_simpo_margin_increases_loss():
    kw = dict(loss_type="simpo", beta=2.0)
    base = preference_loss(t(PC), t(PR), None, None, torch.tensor(LC), torch.tensor(LR), **kw).losses
    margin = preference_loss(t(PC), t(PR), None, None, torch.tensor(LC), torch.tensor(LR), simpo_gamma=1.0, **kw)
    assert bool((margin.losses > base).all())


# --- SamPO ----------------------------------------------------------------------------------------------------

def split(mask, lengths):
    return [seg.tolist() for seg in torch.split(mask, lengths)]


def test_sampo_masks_keep_min_length_from_longer_side_and_all_of_shorter():
    lc, lr = [7, 3, 5, 1], [4, 9, 5, 6]
    cm, rm = sampo_masks(torch.tensor(lc), torch.tensor(lr), torch.tensor([11, 22, 33, 44]))
    assert cm.dtype == torch.bool and cm.numel() == sum(lc) and rm.numel() == sum(lr)
    for c, r, n_c, n_r in zip(split(cm, lc), split(rm, lr), lc, lr):
        assert sum(c) == sum(r) == min(n_c, n_r)
        assert all(c if n_c <= n_r else r)  # the shorter side is kept whole


def test_sampo_masks_deterministic_per_seed_and_vary_across_seeds():
    lc, lr = torch.tensor([40, 3]), torch.tensor([10, 3])
    a = sampo_masks(lc, lr, [5, 6])
    b = sampo_masks(lc, lr, [5, 7])  # pair 0 keeps its seed: same draw regardless of the other pairs
    assert torch.equal(a[0][:40], b[0][:40]) and torch.equal(a[1], b[1])
    draws = {tuple(sampo_masks(lc[:1], lr[:1], [s])[0].tolist()) for s in range(8)}
    assert len(draws) > 1
    assert pair_seed(1, "prompt-7") == pair_seed(1, "prompt-7") != pair_seed(2, "prompt-7")
    assert pair_seed(1, "prompt-7") != pair_seed(1, "prompt-7", epoch=1)
    assert 0 <= pair_seed(123, "x") < 2 ** 63


def test_sampo_loss_applies_same_mask_to_policy_and_reference():
    lc, lr = [5, 2], [2, 4]
    pol_c = t([-0.1, -0.2, -0.3, -0.4, -0.5, -1.0, -2.0], requires_grad=True)
    pol_r = t([-0.6, -0.7, -1.5, -1.6, -1.7, -1.8], requires_grad=True)
    ref_c = t([-0.2, -0.1, -0.9, -0.3, -0.8, -1.1, -1.9])
    ref_r = t([-0.5, -0.9, -1.4, -1.2, -1.9, -2.0])
    cm, rm = sampo_masks(torch.tensor(lc), torch.tensor(lr), [pair_seed(0, "a"), pair_seed(0, "b")])
    sums = [sequence_logps(x, torch.tensor(n), m) for x, n, m in
            ((pol_c, lc, cm), (pol_r, lr, rm), (ref_c, lc, cm), (ref_r, lr, rm))]
    out = preference_loss(*sums, loss_type="sampo", beta=0.5)
    expected, starts = [], {"c": 0, "r": 0}
    for i in range(2):
        sel = {}
        for side, n, m, p, r in (("c", lc[i], cm, pol_c, ref_c), ("r", lr[i], rm, pol_r, ref_r)):
            s = starts[side]
            idx = [k for k in range(s, s + n) if m[k]]
            sel[side] = sum(p[k].item() - r[k].item() for k in idx)
            starts[side] += n
        expected.append(-logsig(0.5 * (sel["c"] - sel["r"])))
    close(out.losses, expected)
    out.losses.sum().backward()
    assert bool((pol_c.grad[~cm] == 0).all()) and bool((pol_c.grad[cm] != 0).all())
    assert bool((pol_r.grad[~rm] == 0).all()) and bool((pol_r.grad[rm] != 0).all())


# --- options, metrics, gradients -------------------------------------------------------------------------------

def test_legacy_names_and_reference_needs():
    assert resolve_loss_type("sigmoid", norm_by_len=True) == "ln_dpo"
    assert resolve_loss_type("sigmoid", use_sampo=True) == "sampo"
    assert resolve_loss_type("ipo") == "ipo"
    for bad in (dict(loss_type="ipo", norm_by_len=True), dict(norm_by_len=True, use_sampo=True),
                dict(loss_type="hinge")):
        with pytest.raises(LossConfigError):
            resolve_loss_type(**bad)
    assert [needs_reference(k) for k in ("sigmoid", "ipo", "ln_dpo", "simpo", "sampo")] == [True] * 3 + [False, True]


@pytest.mark.parametrize("kw", [dict(loss_type="ipo", label_smoothing=0.1), dict(simpo_gamma=0.5),
                                dict(label_smoothing=0.7), dict(beta=0.0)])
def test_ignored_or_invalid_settings_raise(kw):
    with pytest.raises(LossConfigError) as info:
        run(**{"loss_type": "sigmoid", **kw})
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_missing_reference_or_lengths_raise():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(t(PC), t(PR), None, None, loss_type="sigmoid")
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(t(PC), t(PR), t(RC), t(RR), loss_type="ipo")


def test_metrics_use_trl_names():
    out = run("sigmoid", beta=0.1)
    m = preference_metrics(out, t(PC), t(PR))
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    margins = [0.1 * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]
    close(m["rewards/margins"], margins)
    close(m["rewards/accuracies"], [1.0 if x > 0 else 0.0 for x in margins])
    close(m["logps/chosen"], PC)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "ln_dpo", "simpo", "sampo"])
def test_gradients_flow_to_policy(loss_type):
    pc, pr = t(PC, requires_grad=True), t(PR, requires_grad=True)
    rc, rr = t(RC, requires_grad=True), t(RR, requires_grad=True)
    refs = (None, None) if loss_type == "simpo" else (rc, rr)
    out = preference_loss(pc, pr, *refs, torch.tensor(LC), torch.tensor(LR), loss_type=loss_type)
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and bool((pc.grad != 0).all()) and bool((pr.grad != 0).all())
    assert not out.chosen_rewards.requires_grad and not out.logits.requires_grad
