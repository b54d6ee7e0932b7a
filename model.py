"""The DeepAVFusion encoder (paper Sec. 3.1, Eq. 1-3) and its checkpoint loading."""
# Three branches of equal depth: a ViT over image patches, a ViT over log-mel spectrogram patches, and a fusion
# branch that updates F learnable fusion tokens. At a layer with a fusion block (Eq. 1-3):
#
#     X^v_l  = image block on cat(X^mm_{l-1}, X^v_{l-1}), image part kept      (Eq. 2)
#     X^a_l  = audio block on cat(X^mm_{l-1}, X^a_{l-1}), audio part kept      (Eq. 3)
#     X^mm_l = fusion block (X^mm_{l-1}, X^v_{l-1}, X^a_{l-1})                  (Eq. 1)
#
# At a layer without one only the unimodal blocks run. Parameter names follow the official code, so the authors'
# checkpoints, and MAE / AudioMAE ViT checkpoints for the branches, load here (`load_checkpoint`, `load_unimodal`).
import dataclasses
from dataclasses import dataclass, field
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import check_state_dict, describe_checkpoint, read_state_dict
from fusion import FUSION_TYPES, DropPath, FusionBlock, Mlp, merge_heads, split_heads

VIT_NORM_EPS = 1e-6  # the ViT branches use LayerNorm(eps=1e-6), as MAE does


def _field(default, help, choices=None):
    """A config field with its help text: the one description that `--help` shows for its flag."""
    return field(default=default, metadata={'help': help, 'choices': choices})


@dataclass
class DeepAVFusionConfig:
    """Shape of the encoder; defaults: the paper's ViT-B (Sec. 4.1). Every field is a flag of both scripts."""
    image_size: Union[int, Tuple[int, int]] = _field(224, 'image side in pixels')
    audio_size: Tuple[int, int] = (128, 192)  # mel bands x frames: fixed by the audio front-end, not a flag
    patch_size: int = _field(16, 'patch side, for images and spectrograms')
    embed_dim: int = _field(768, 'token width D of all three branches')
    depth: int = _field(12, 'layers of each branch')
    num_heads: int = _field(12, 'attention heads of the ViT branches')
    mlp_ratio: float = _field(4.0, 'MLP width / D in the ViT branches')
    fusion: str = _field('factorized', "'factorized' (Eq. 9-13), 'dense' (Eq. 4-8), 'token' (MBT) or 'none'",
                         choices=FUSION_TYPES)
    fusion_layers: str = _field('all', "layers with fusion: 'all', 'none', or indices, '8-9-10-11' (mid), '11'")
    num_fusion_tokens: int = _field(16, 'fusion tokens F')
    num_aggr_image_tokens: int = _field(8, 'image aggregation tokens (factorized; stored with the fusion tokens)')
    num_aggr_audio_tokens: int = _field(8, 'audio aggregation tokens (factorized; stored with the fusion tokens)')
    fusion_mlp_ratio: float = _field(1.0, 'MLP width / D in the fusion blocks (Sec. 4.1: 1)')
    fusion_attn_ratio: float = _field(0.25, 'similarity-space width / D in the fusion attention (Sec. 4.1)')
    fusion_num_heads: int = _field(12, 'attention heads of the fusion blocks')
    drop_path: float = _field(0.0, 'stochastic depth rate of every block')
    separable: bool = _field(True, 'pair attention in its exact separable form; --no-separable: every pair')

    def __post_init__(self):
        if self.fusion not in FUSION_TYPES:
            raise ValueError(f"fusion={self.fusion!r}: expected one of {', '.join(FUSION_TYPES)}")
        self.fusion_layer_ids  # validates the string
        for name, (h, w) in (('image_size', self.image_hw), ('audio_size', tuple(self.audio_size))):
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(f"{name}=({h}, {w}) is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads or self.embed_dim % self.fusion_num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads} "
                             f"and fusion_num_heads={self.fusion_num_heads}")

    @property
    def image_hw(self):
        """image_size as an (h, w) pair."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else tuple(s)

    @property
    def fusion_layer_ids(self):
        """Indices of the layers that have a fusion block, parsed from `fusion_layers`."""
        return parse_fusion_layers(self.fusion_layers, self.depth) if self.fusion != 'none' else []

    @property
    def fusion_tokens_split(self):
        """(fusion, image-aggregation, audio-aggregation) token counts, in the order they are stored."""
        return self.num_fusion_tokens, self.num_aggr_image_tokens, self.num_aggr_audio_tokens


def parse_fusion_layers(spec, depth):
    """'all' -> every layer, 'none' -> [], '9-10-11' -> [9, 10, 11]; anything else is a ValueError."""
    spec = str(spec)
    if spec == 'all':
        return list(range(depth))
    if spec == 'none':
        return []
    try:
        layers = sorted({int(s) for s in spec.split('-')})
    except ValueError:
        layers = None
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ValueError(f"fusion_layers={spec!r}: expected 'all', 'none' or layer indices in [0, {depth}) "
                         f"joined by '-', e.g. '9-10-11' (mid fusion) or '{depth - 1}' (late fusion)")
    return layers


PRESETS = {
    # Pre-trains on a 2-core CPU in minutes (about 40 clips/s at batch 32); fusion heads of 16 as in the paper.
    'tiny': DeepAVFusionConfig(image_size=96, embed_dim=192, depth=4, num_heads=3, fusion_num_heads=3),
    'base': DeepAVFusionConfig(),  # the paper's ViT-B (Sec. 4.1)
}


def get_config(preset='base', **overrides):
    """A named preset ('base', 'tiny') with some fields replaced, e.g. get_config('tiny', fusion='dense')."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos positions (1, grid_h * grid_w, dim), MAE's: channels [column half; row half], each half
    [sin(p w_k), cos(p w_k)], w_k = 10000^(-2k/half)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing='ij')
    col, row = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float().unsqueeze(0)


def positions(pos_embed, branch, x):
    """`pos_embed` for `branch`'s input `x`, checked; audio narrower by whole patches takes the first columns'."""
    # Narrower audio is finetune's --audio_seconds: the first S s of the window, at the positions they had there.
    (H, W), (h, w), audio = branch.input_size, branch.grid, branch.name == 'audio'
    cols = x.shape[-1] * w // W if audio and x.ndim == 4 and 0 < x.shape[-1] < W else w
    if x.ndim != 4 or tuple(x.shape[1:]) != (branch.in_chans, H, cols * W // w):
        raise ValueError(f"{branch.name} input must have shape (B, {branch.in_chans}, {H}, {W}), got {tuple(x.shape)}"
                         + (f" (or be narrower by whole {W // w}-frame patches)" if audio else ''))
    return pos_embed if cols == w else pos_embed.reshape(1, h, w, -1)[:, :, :cols].reshape(1, h * cols, -1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_eps=VIT_NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, a strided convolution."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """One modality branch: patch embedding, fixed sin-cos positions (no class token), pre-norm blocks, norm."""

    def __init__(self, name, in_chans, input_size, patch_size, dim, depth, num_heads, mlp_ratio, drop_path):
        super().__init__()
        self.name, self.in_chans, self.input_size = name, in_chans, tuple(input_size)
        self.grid = (input_size[0] // patch_size, input_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        # A buffer, not a parameter: the positions are fixed (MAE) and never learn, but they are in the state dict.
        self.register_buffer('pos_embed', sincos_pos_embed(dim, *self.grid))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, drop_path) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=VIT_NORM_EPS)

    def embed(self, x, ids_keep=None):
        """Patch tokens with positions, keeping only the patches `ids_keep` (B, n_keep) if given (MAE masking)."""
        x = positions(self.pos_embed, self, x) + self.patch_embed(x)  # positions first: they check x
        if ids_keep is not None:
            x = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return x


class DeepAVFusion(nn.Module):
    """The three-branch early-fusion encoder of Eq. 1-3."""

    def __init__(self, config: DeepAVFusionConfig):
        super().__init__()
        c = self.config = config
        vit = dict(patch_size=c.patch_size, dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
                   mlp_ratio=c.mlp_ratio, drop_path=c.drop_path)
        self.image, self.audio = ViT('image', 3, c.image_hw, **vit), ViT('audio', 1, c.audio_size, **vit)
        # One parameter for every fusion type; only the factorized block splits it into
        # (fusion, image-aggregation, audio-aggregation) tokens.
        self.fusion_tokens = nn.Parameter(torch.zeros(1, sum(c.fusion_tokens_split), c.embed_dim))
        # Indexed by layer with None where a layer has no fusion block, so keys read fusion_blocks.<layer>.
        layers = set(c.fusion_layer_ids)
        self.fusion_blocks = nn.ModuleList([
            FusionBlock(c.fusion, c.embed_dim, c.fusion_num_heads, c.fusion_attn_ratio, c.fusion_mlp_ratio,
                        c.fusion_tokens_split, c.drop_path, c.separable) if i in layers else None
            for i in range(c.depth)])
        self.fusion_norm = nn.LayerNorm(c.embed_dim, eps=1e-5)
        init_encoder(self, (self.image.patch_embed, self.audio.patch_embed), (self.fusion_tokens,))

    def forward(self, image, audio, image_ids_keep=None, audio_ids_keep=None, return_layers=False, unimodal=False):
        """image (B, 3, H, W), audio (B, 1, mels, frames) -> normalised (x_image, x_audio, x_fusion) of the patches
        `*_ids_keep` (B, n_keep) if given; `return_layers` adds every layer's; `unimodal`: the branches alone."""
        # `*_ids_keep` is MAE masking. With `return_layers` a fourth value lists every layer's unnormalised (x_image,
        # x_audio, x_fusion), for the heads that read inner layers. With `unimodal` the branches run alone, without
        # the fusion tokens that carry the other modality (Eq. 2-3).
        x_image, x_audio = self.image.embed(image, image_ids_keep), self.audio.embed(audio, audio_ids_keep)
        if x_image.shape[0] != x_audio.shape[0]:
            raise ValueError(f"image and audio batch sizes differ: {x_image.shape[0]} vs {x_audio.shape[0]}")
        x_fusion = self.fusion_tokens.expand(x_image.shape[0], -1, -1)
        n_fusion, n_image, n_audio = x_fusion.shape[1], x_image.shape[1], x_audio.shape[1]
        layers = []
        for blk_image, blk_audio, blk_fusion in zip(self.image.blocks, self.audio.blocks, self.fusion_blocks):
            if blk_fusion is None or unimodal:
                x_image, x_audio = blk_image(x_image), blk_audio(x_audio)
            else:
                new_image = blk_image(torch.cat([x_fusion, x_image], dim=1))[:, n_fusion:]  # Eq. 2
                new_audio = blk_audio(torch.cat([x_fusion, x_audio], dim=1))[:, n_fusion:]  # Eq. 3
                x_fusion = blk_fusion(x_fusion, x_image, x_audio)  # Eq. 1, from the previous layer's tokens
                x_image, x_audio = new_image, new_audio
            if return_layers:
                layers.append((x_image, x_audio, x_fusion))
        assert x_image.shape[1] == n_image and x_audio.shape[1] == n_audio
        out = (self.image.norm(x_image), self.audio.norm(x_audio), self.fusion_norm(x_fusion))
        return (*out, layers) if return_layers else out

    def load_checkpoint(self, source, weights_only=True):
        """Load an official or this project's checkpoint strictly (a path or dict; encoder-only or 'encoder.*')."""
        sd = read_state_dict(source, weights_only)
        if any(k.startswith('encoder.') for k in sd):
            sd = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}
        check_state_dict(self, sd, source, hint=describe_checkpoint(sd))
        self.load_state_dict(sd, strict=True)

    def load_unimodal(self, branch, source, weights_only=True, layout='auto'):
        """Initialise `branch` from an MAE-format ViT (MAE's mae_pretrain_vit_base.pth, the AudioMAE ViT-B)."""
        if branch not in ('image', 'audio'):
            raise ValueError(f"branch must be 'image' or 'audio', got {branch!r}")
        if layout not in ('auto', 'as_is'):
            raise ValueError(f"layout must be 'auto' or 'as_is', got {layout!r}")
        sd = read_state_dict(source, weights_only)
        # AudioMAE's patches are (time, frequency), a 64 x 8 grid of 512 positions (+1, its class token); this
        # spectrogram is (frequency, time), so with layout 'auto' its kernel is transposed, each kernel seeing a
        # patch the way round it was trained on; 'as_is' loads it unchanged, as the official code does.
        if layout == 'auto' and branch == 'audio' and is_audiomae(sd):
            sd = {**sd, 'patch_embed.proj.weight': sd['patch_embed.proj.weight'].transpose(-1, -2)}
        # The class token, decoder, mask token and a classifier head are dropped, and the sin-cos positions recomputed.
        sd = {k: v for k, v in sd.items()
              if not k.startswith(('decoder', 'mask_token', 'cls_token', 'pos_embed', 'head.'))}
        vit = getattr(self, branch)
        sd['pos_embed'] = vit.pos_embed
        check_state_dict(vit, sd, source)
        vit.load_state_dict(sd, strict=True)


def is_audiomae(sd):
    """An AudioMAE ViT's state dict: MAE's layout, one input channel and a 512 (+1) position table (AudioMAE's
    1024 x 128 (time x frequency) input in 16 x 16 patches)."""
    w, pos = sd.get('patch_embed.proj.weight'), sd.get('pos_embed')
    return w is not None and w.ndim == 4 and w.shape[1] == 1 and pos is not None and pos.shape[1] in (512, 513)


def pooled(outputs):
    """Global features of the encoder's outputs (App. A): the mean of the image patch tokens, of the audio patch
    tokens and of the fusion tokens, as {'image', 'audio', 'fusion'}."""
    x_image, x_audio, x_fusion = outputs[:3]
    return {'image': x_image.mean(1), 'audio': x_audio.mean(1), 'fusion': x_fusion.mean(1)}


def init_weights(m):
    """The official initialisation, module by module: xavier-uniform Linear weights, He-normal (fan-out) head
    convolutions (the encoder's patch embeddings are Linear-like: DeepAVFusion), zero biases, unit norms."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm, nn.BatchNorm2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)


def init_encoder(encoder, patch_embeds, tokens):
    """The official encoders' initialisation (DeepAVFusion's, CAV-MAE's): init_weights on every module but the
    patch embeddings, which are initialised like Linear layers (MAE), then learned tokens N(0, 0.02)."""
    for m in encoder.modules():  # leaves in the order of encoder.apply
        if not isinstance(m, nn.Conv2d):
            init_weights(m)
    for embed in patch_embeds:
        nn.init.xavier_uniform_(embed.proj.weight.view(embed.proj.weight.shape[0], -1))
    for t in tokens:
        nn.init.normal_(t, std=0.02)
