"""Fusion blocks: an independent per-pair reference, and the separable form equal to the literal one."""
import pytest
import torch
import torch.nn.functional as F

from fusion import FusionBlock
from helpers import randomize, small_config
from model import DeepAVFusion

D, HEADS, RATIO, SPLIT = 64, 4, 0.25, (6, 3, 5)


def attend(q, k, v, heads, scale):
    """softmax(q k^T * scale) v for one sample, heads taking consecutive channel chunks."""
    dq, dv = q.shape[1] // heads, v.shape[1] // heads
    out = []
    for h in range(heads):
        w = torch.softmax(q[:, h * dq:(h + 1) * dq] @ k[:, h * dq:(h + 1) * dq].T * scale, dim=-1)
        out.append(w @ v[:, h * dv:(h + 1) * dv])
    return torch.cat(out, dim=1)


def lin(layer, x):
    return x @ layer.weight.T + layer.bias


def reference_block(blk, kind, x, xv, xa):
    """The official computation, written pair by pair for one sample (fusion.py states it)."""
    ln = lambda m, t: F.layer_norm(t, (D,), m.weight, m.bias, m.eps)
    x = ln(blk.norm1_mm, x)
    if kind == 'token':  # the official argument swap: norm1_aud on image tokens, norm1_img on audio tokens
        xv, xa = ln(blk.norm1_aud, xv), ln(blk.norm1_img, xa)
    else:
        xv, xa = ln(blk.norm1_img, xv), ln(blk.norm1_aud, xa)
    a, inner = blk.attn, int(D * RATIO)
    if kind == 'token':
        kv = lin(a.kv, torch.cat([xv, xa]))
        res = lin(a.proj, attend(lin(a.q, x), kv[:, :inner], kv[:, inner:], HEADS, (inner / HEADS) ** -0.5))
    elif kind == 'dense':  # pairs cat(audio_i, image_j), audio first
        pairs = torch.stack([torch.cat([xa[i], xv[j]]) for i in range(len(xa)) for j in range(len(xv))])
        kv = lin(a.kv, pairs)
        res = lin(a.proj, attend(lin(a.q, x), kv[:, :inner], kv[:, inner:], HEADS, (D / HEADS) ** -0.5))
    else:  # factorized: aggregation by cross-attention, then pairs cat(image_aggr_i, audio_aggr_j)
        n, nv, na = SPLIT
        xm, av, aa = x[:n], x[n:n + nv], x[n + nv:]

        def cross(m, t, ctx):
            kv = lin(m.kv, ctx)
            return lin(m.proj, attend(lin(m.q, t), kv[:, :D], kv[:, D:], HEADS, (D / HEADS) ** -0.5))

        av, aa = cross(a.attn_v, av, xv), cross(a.attn_a, aa, xa)
        pairs = torch.stack([torch.cat([av[i], aa[j]]) for i in range(nv) for j in range(na)])
        xm = lin(a.proj, attend(lin(a.q, xm), lin(a.k, pairs), lin(a.v, pairs), HEADS, (D / HEADS) ** -0.5))
        res = torch.cat([xm, av, aa])
    x = x + res
    return x + lin(blk.mlp.fc2, F.gelu(lin(blk.mlp.fc1, ln(blk.norm2, x))))


@pytest.mark.parametrize('kind', ['token', 'dense', 'factorized'])
@pytest.mark.parametrize('separable', [True, False])
def test_block_matches_pairwise_reference(kind, separable):
    torch.manual_seed(0)
    blk = randomize(FusionBlock(kind, D, HEADS, RATIO, 1.0, SPLIT, separable=separable)).eval()
    x, xv, xa = torch.randn(2, sum(SPLIT), D), torch.randn(2, 7, D), torch.randn(2, 5, D)
    out = blk(x, xv, xa)
    with torch.no_grad():
        for b in range(2):
            torch.testing.assert_close(out[b], reference_block(blk, kind, x[b], xv[b], xa[b]), atol=1e-5, rtol=0)


def test_argument_order_matters():
    """The reference is sensitive to the facts it checks: swapping image and audio changes the output."""
    torch.manual_seed(0)
    blk = randomize(FusionBlock('dense', D, HEADS, RATIO, 1.0, SPLIT)).eval()
    x, xv, xa = torch.randn(1, sum(SPLIT), D), torch.randn(1, 5, D), torch.randn(1, 5, D)
    assert (blk(x, xv, xa) - blk(x, xa, xv)).abs().max() > 1e-3


def run_both(fusion, dtype, masked):
    """Outputs and gradients of the literal and separable encoders with the same weights and inputs."""
    torch.manual_seed(0)
    literal = randomize(DeepAVFusion(small_config(fusion=fusion, separable=False))).to(dtype)
    separable = DeepAVFusion(small_config(fusion=fusion, separable=True)).to(dtype)
    separable.load_state_dict(literal.state_dict())
    image, audio = torch.randn(3, 3, 64, 64, dtype=dtype), torch.randn(3, 1, 32, 48, dtype=dtype)
    ids = (torch.rand(3, 16).argsort(1)[:, :4], torch.rand(3, 6).argsort(1)[:, :2]) if masked else ()
    weights = [torch.randn(o.shape, dtype=dtype) for o in literal(image, audio, *ids)]
    results = []
    for model in (literal, separable):
        out = model(image, audio, *ids)
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize('fusion', ['dense', 'factorized'])
@pytest.mark.parametrize('masked', [False, True])
def test_separable_equals_literal_forward_and_gradients(fusion, masked):
    (out_l, grad_l), (out_s, grad_s) = run_both(fusion, torch.float32, masked)
    for a, b in zip(out_l, out_s):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert grad_l.keys() == grad_s.keys()
    for n in grad_l:
        # float32 keeps ~7 digits: gradients agree to 1e-5 of their size (absolutely, below size 1).
        scale = max(grad_l[n].abs().max().item(), 1.0)
        assert (grad_l[n] - grad_s[n]).abs().max().item() <= 1e-5 * scale, n


@pytest.mark.parametrize('fusion', ['dense', 'factorized'])
def test_separable_is_exact_in_float64(fusion):
    """In double precision the two forms agree to rounding (1e-10), so the float32 gap is rounding too."""
    (out_l, grad_l), (out_s, grad_s) = run_both(fusion, torch.float64, masked=True)
    for a, b in zip(out_l, out_s):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for n in grad_l:
        torch.testing.assert_close(grad_l[n], grad_s[n], atol=1e-10, rtol=1e-10, msg=lambda m: f"{n}: {m}")
