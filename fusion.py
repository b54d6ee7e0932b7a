"""Fusion blocks of DeepAVFusion: the fusion branch Phi^mm of Eq. 1 (paper Sec. 3.1, Eq. 4-13)."""
# A fusion block updates the fusion tokens X^mm from the image tokens X^v and audio tokens X^a of the previous
# layer. Three kinds, the rows of the paper's Tables 4 and 5:
#
#     token       MBT-style token fusion: the fusion tokens cross-attend to every image and audio token.
#     dense       dense interactions (Eq. 4-8): the fusion tokens cross-attend to all n_a x n_v audio-visual pairs
#                 X^av_ij = W^a X^a_i + W^v X^v_j.
#     factorized  factorized interactions (Eq. 9-13): image and audio tokens are first summarised into a few
#                 aggregation tokens (Eq. 9-10), and the fusion tokens cross-attend to the pairs of those (Eq. 11-13).
#
# Dense and factorized come in two forms that compute the same function (`pair_attention`):
#
#     literal     builds every pair feature, as Eq. 4-5 and 11-12 read: O(n_a n_v) time and memory. This is the
#                 definition, and what the official code computes.
#     separable   (the default) the same attention as two ordinary cross-attentions, one per modality, summed:
#                 O(n_a + n_v). Exact, not an approximation; the derivation is in `pair_attention_separable`.
#
# Names and shapes follow the official code (its checkpoints load strictly); model.py reuses `Mlp`, `DropPath`.
import torch
import torch.nn as nn
import torch.nn.functional as F

FUSION_TYPES = ('token', 'dense', 'factorized', 'none')

# LayerNorm eps inside fusion blocks: the official code uses nn.LayerNorm's default here (and 1e-6 in the ViTs).
FUSION_NORM_EPS = 1e-5


class Mlp(nn.Module):
    """Transformer feed-forward network: Linear, GELU, Linear."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability p while training."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def split_heads(x, num_heads):
    """(B, N, C) -> (B, heads, N, C / heads), heads taking consecutive channel chunks as in the official code."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x):
    """(B, heads, N, d) -> (B, N, heads * d), the inverse of `split_heads`."""
    return x.transpose(1, 2).flatten(2)


def pair_attention_literal(q, x1, x2, key, value, num_heads, scale):
    """Attention of q (B, heads, Nq, key_dim / heads) over all n1 x n2 pairs p_ij = [x1_i; x2_j] of x1 (B, n1, D) and
    x2 (B, n2, D); key, value: (weight, bias) acting on a pair. Returns (B, heads, Nq, value_dim / heads)."""
    # As Eq. 4-7 (and 11-13) read. Eq. 4 maps a pair linearly, X^av_ij = W^a X^a_i + W^v X^v_j; the key and value
    # projections that follow are linear too, so each is one linear map of the concatenated pair [x1_i; x2_j]. The
    # result is the Softmax(Q K^T) V of Eq. 7 over the n1 * n2 pairs of Eq. 5.
    n1, n2 = x1.shape[1], x2.shape[1]
    # Eq. 5: every pair feature, x1 as the outer index: (B, n1 * n2, 2D).
    pairs = torch.cat([x1[:, :, None].expand(-1, -1, n2, -1), x2[:, None].expand(-1, n1, -1, -1)], dim=-1)
    pairs = pairs.flatten(1, 2)
    k, v = F.linear(pairs, *key), F.linear(pairs, *value)
    return F.scaled_dot_product_attention(q, split_heads(k, num_heads), split_heads(v, num_heads), scale=scale)


def pair_attention_separable(q, x1, x2, key, value, num_heads, scale):
    """The same function as `pair_attention_literal`, without forming a single pair: O(n1 + n2), not O(n1 n2)."""
    # Why it is exact. Split each weight by the half of the pair it reads, W = [W_1 W_2]. The key and value of a
    # pair are then sums of a term of x1_i and a term of x2_j:
    #
    #     k_ij = W_1 x1_i + W_2 x2_j + b = a_i + c_j        (a_i = W_1 x1_i + b,  c_j = W_2 x2_j)
    #     v_ij = U_1 x1_i + U_2 x2_j + e = u_i + w_j        (u_i = U_1 x1_i + e,  w_j = U_2 x2_j)
    #
    # For one query q the logit of pair (i, j) is s * q.k_ij = s q.a_i + s q.c_j, so its exponential factorises,
    # exp(s q.a_i) exp(s q.c_j), and so does the normaliser, sum_ij = (sum_i exp(s q.a_i)) (sum_j exp(s q.c_j)).
    # The softmax over pairs is therefore the product of two ordinary softmaxes, P_ij = p_i r_j, with
    # p = softmax_i(s q.a_i) and r = softmax_j(s q.c_j). Each sums to one, so the attention output is
    #
    #     sum_ij p_i r_j (u_i + w_j) = sum_i p_i u_i + sum_j r_j w_j,
    #
    # a cross-attention of q over the x1 side plus one over the x2 side, sharing the query. The key bias b only
    # shifts every logit by s q.b and cancels in the softmax, so it may sit on either side; the value bias e is
    # added once because the p_i sum to one. This holds for every head separately, and as long as nothing acts on
    # the attention weights (the official blocks have no attention dropout); tests check it to float rounding.
    D, h = x1.shape[-1], num_heads
    (wk, bk), (wv, bv) = key, value
    k1, v1 = F.linear(x1, wk[:, :D], bk), F.linear(x1, wv[:, :D], bv)  # a_i, u_i: both biases on this side
    k2, v2 = F.linear(x2, wk[:, D:]), F.linear(x2, wv[:, D:])  # c_j, w_j
    return (F.scaled_dot_product_attention(q, split_heads(k1, h), split_heads(v1, h), scale=scale)
            + F.scaled_dot_product_attention(q, split_heads(k2, h), split_heads(v2, h), scale=scale))


def pair_attention(q, x1, x2, key, value, num_heads, scale, separable=True):
    """Attention over all audio-visual pairs: the separable fast path, or the literal definition."""
    return (pair_attention_separable if separable else pair_attention_literal)(q, x1, x2, key, value, num_heads, scale)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x, keys and values from context, in width `inner` (default: dim).
    The aggregation step of the factorized block (Eq. 9-10), with no residual and no MLP, as in the official code."""

    def __init__(self, dim, num_heads, inner=None):
        super().__init__()
        inner = dim if inner is None else inner
        self.num_heads = num_heads
        self.q = nn.Linear(dim, inner)
        self.kv = nn.Linear(dim, 2 * inner)  # keys first, then values
        self.proj = nn.Linear(inner, dim)

    def forward(self, x, context):
        h = self.num_heads
        k, v = self.kv(context).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split_heads(self.q(x), h), split_heads(k, h), split_heads(v, h))
        return self.proj(merge_heads(out))


class TokenFusionAttention(CrossAttention):
    """Token fusion (MBT): fusion tokens attend to the union of image and audio tokens in a space reduced by
    `attn_ratio`; no audio-visual pairs, the baseline of Table 4 (#3)."""

    def __init__(self, dim, num_heads, attn_ratio):
        super().__init__(dim, num_heads, int(dim * attn_ratio))

    def forward(self, x, x_image, x_audio):
        return super().forward(x, torch.cat([x_image, x_audio], dim=1))


class DenseAttention(nn.Module):
    """Dense audio-visual interactions (Eq. 4-7): fusion tokens attend to all pairs (audio_i, image_j)."""

    def __init__(self, dim, num_heads, attn_ratio, separable=True):
        super().__init__()
        self.inner, self.num_heads, self.separable = int(dim * attn_ratio), num_heads, separable
        # The logit scale uses the full head size D / heads, not the reduced one (official code).
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, self.inner)
        # `kv` maps the pair feature cat(audio_i, image_j) (audio first, as in the official code) to keys and values:
        # Eq. 4's W^a, W^v followed by the key/value projections, folded into one linear map.
        self.kv = nn.Linear(2 * dim, 2 * self.inner)
        self.proj = nn.Linear(self.inner, dim)

    def forward(self, x, x_image, x_audio):
        q = split_heads(self.q(x), self.num_heads)
        w, b, r = self.kv.weight, self.kv.bias, self.inner  # keys are the first half of kv's outputs
        out = pair_attention(q, x_audio, x_image, (w[:r], b[:r]), (w[r:], b[r:]), self.num_heads, self.scale,
                             self.separable)
        return self.proj(merge_heads(out))


class FactorizedAttention(nn.Module):
    """Factorized audio-visual interactions (Eq. 9-13)."""

    def __init__(self, dim, num_heads, attn_ratio, num_tokens, separable=True):
        super().__init__()
        # The fusion-token parameter holds (fusion, image-aggregation, audio-aggregation) tokens, in that order.
        self.num_tokens = tuple(num_tokens)
        self.inner, self.num_heads, self.separable = int(dim * attn_ratio), num_heads, separable
        self.scale = (dim // num_heads) ** -0.5
        # The aggregation tokens are updated by plain cross-attention to their modality (Eq. 9-10).
        self.attn_v, self.attn_a = CrossAttention(dim, num_heads), CrossAttention(dim, num_heads)
        # The fusion tokens then attend to all pairs cat(image_aggr_i, audio_aggr_j) (image first; Eq. 11-13), with
        # keys in the reduced space (`k`: 2D -> rD) and values at full width (`v`: 2D -> D).
        self.q = nn.Linear(dim, self.inner)
        self.k, self.v = nn.Linear(2 * dim, self.inner), nn.Linear(2 * dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, x_image, x_audio):
        x_mm, aggr_v, aggr_a = x.split(self.num_tokens, dim=1)
        aggr_v = self.attn_v(aggr_v, x_image)  # Eq. 10
        aggr_a = self.attn_a(aggr_a, x_audio)  # Eq. 9
        q = split_heads(self.q(x_mm), self.num_heads)
        out = pair_attention(q, aggr_v, aggr_a, (self.k.weight, self.k.bias), (self.v.weight, self.v.bias),
                             self.num_heads, self.scale, self.separable)  # Eq. 11-13
        return torch.cat([self.proj(merge_heads(out)), aggr_v, aggr_a], dim=1)


class FusionBlock(nn.Module):
    """One layer of the fusion branch, Phi^mm_l in Eq. 1: cross-attention (Eq. 6-7) then an MLP (Eq. 8)."""

    def __init__(self, kind, dim, num_heads, attn_ratio=0.25, mlp_ratio=1.0, num_tokens=(16, 8, 8),
                 drop_path=0.0, separable=True):
        super().__init__()
        if kind not in ('token', 'dense', 'factorized'):
            raise ValueError(f"fusion block kind must be 'token', 'dense' or 'factorized', got {kind!r}")
        self.kind = kind
        self.norm1_mm, self.norm1_aud, self.norm1_img = (nn.LayerNorm(dim, eps=FUSION_NORM_EPS) for _ in range(3))
        self.attn = (TokenFusionAttention(dim, num_heads, attn_ratio) if kind == 'token' else
                     DenseAttention(dim, num_heads, attn_ratio, separable) if kind == 'dense' else
                     FactorizedAttention(dim, num_heads, attn_ratio, num_tokens, separable))
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=FUSION_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, x_image, x_audio):
        """x: fusion tokens (B, F, D); x_image (B, n_v, D), x_audio (B, n_a, D): the previous layer's tokens."""
        # As in the official code the three inputs are normalised first and the attention output is added to the
        # *normalised* fusion tokens: x = norm1_mm(x) + attn(...); x = x + mlp(norm2(x)).
        x = self.norm1_mm(x)
        if self.kind == 'token':
            # The official token-fusion block receives its arguments in swapped order, so `norm1_aud` ends up
            # normalising the image tokens and `norm1_img` the audio tokens. Kept, so its checkpoints work.
            x_image, x_audio = self.norm1_aud(x_image), self.norm1_img(x_audio)
        else:
            x_image, x_audio = self.norm1_img(x_image), self.norm1_aud(x_audio)
        z = x + self.drop_path(self.attn(x, x_image, x_audio))  # Eq. 7: Z = X + Softmax(Q K^T) V
        return z + self.drop_path(self.mlp(self.norm2(z)))  # Eq. 8: X = Z + MLP(Z)
