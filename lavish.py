"""LAVISH (Lin et al., CVPR 2023): a frozen ViT adapted to audio-visual tasks by small trainable adapters."""
# The adapters, four per block, are how each stream reads the other. Its supplementary and the official code
# (GenjiB/LAVISH, the AVE version, net_trans.py) are the reference; finetune.py --adapter lavish wraps the encoder
# of --init.
#
#     A(x, y):  L <- L + softmax(L y^T) y         the adapter's latent tokens read the other modality y
#               x <- x + g_av softmax(x L^T) L     then the stream x reads the latents (g_av starts at 0)
#               o  = g LN(BN(up(ReLU(BN(down(LN(x)))))))   a 1x1 group-convolution bottleneck (g starts at 0)
#
# No query, key or value projections and no 1/sqrt(D) in the two attentions, as the official code. At every layer,
# in both directions, parallel to attention and to the MLP (net_trans.py's ViT forward):
#
#     X^v <- X^v + Attn(LN1(X^v)) + A^v_attn(X^v, X^a)       X^a likewise with A^a_attn(X^a, X^v)
#     X^v <- X^v + MLP(LN2(X^v))  + A^v_mlp(X^v, X^a)        on the post-attention states
#
# The backbone never learns, LayerNorms included; with both gates at 0 the adapted encoder is the frozen one.
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DeepAVFusion, positions, sincos_pos_embed

STREAMS = ('image_attn', 'audio_attn', 'image_mlp', 'audio_mlp')  # the four adapters of a layer


class Adapter(nn.Module):
    """One LAVISH adapter A(x, y): `tokens` latents, a bottleneck of D / `reduction` channels in `groups` groups."""

    def __init__(self, dim, tokens, reduction, groups, variant='ave'):
        super().__init__()
        hidden = dim // reduction
        if dim % reduction or hidden % groups or dim % groups:
            raise ValueError(f"LAVISH adapter: width {dim} / reduction {reduction} = {dim / reduction:g} channels "
                             f"must be a whole number divisible by groups={groups}")
        if variant not in ('ave', 'avs'):
            raise ValueError(f"LAVISH variant {variant!r}: expected 'ave' or 'avs'")
        # `variant` 'ave' (the AVE code, default): latents U[0, 1), LayerNorm before the bottleneck, gate after the last
        # LayerNorm; 'avs' (the AVSBench code): zero latents, no LayerNorm before, the gate before the last one.
        self.variant = variant
        self.latents = nn.Parameter(torch.rand(1, tokens, dim) if variant == 'ave' else torch.zeros(1, tokens, dim))
        # Gates of the stream's read of the latents and of the adapter's output.
        self.gate_av, self.gate = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.ln_before = nn.LayerNorm(dim) if variant == 'ave' else nn.Identity()
        self.down, self.bn1 = nn.Conv2d(dim, hidden, 1, groups=groups, bias=False), nn.BatchNorm2d(hidden)
        self.up, self.bn2 = nn.Conv2d(hidden, dim, 1, groups=groups, bias=False), nn.BatchNorm2d(dim)
        self.ln_post = nn.LayerNorm(dim)

    def forward(self, x, y):
        """x (B, N, D) the adapted stream, y (B, M, D) the other modality -> the residual (B, N, D) added to x."""
        lat = self.latents.expand(x.shape[0], -1, -1)
        lat = lat + torch.softmax(lat @ y.transpose(1, 2), dim=-1) @ y
        x = self.ln_before(x + self.gate_av * (torch.softmax(x @ lat.transpose(1, 2), dim=-1) @ lat))
        # Tokens as a (B, D, N, 1) image: the convolutions mix channels per token, BatchNorm runs over batch x tokens.
        o = self.bn2(self.up(F.relu(self.bn1(self.down(x.transpose(1, 2).unsqueeze(-1))))))
        o = o.squeeze(-1).transpose(1, 2)
        return self.gate * self.ln_post(o) if self.variant == 'ave' else self.ln_post(self.gate * o)


class LAVISH(nn.Module):
    """LAVISH adapters on a frozen DeepAVFusion encoder's ViT branches, behind the encoder's interface for the heads."""

    def __init__(self, encoder, backbone='shared', tokens=16, reduction=4, groups=2, variant='ave'):
        super().__init__()
        if not isinstance(encoder, DeepAVFusion):
            raise ValueError(f"--adapter lavish adapts the ViT branches of a DeepAVFusion encoder, not a "
                             f"{type(encoder).__name__} (its --system)")
        if backbone not in ('shared', 'separate'):
            raise ValueError(f"--lavish_backbone {backbone!r}: expected 'shared' or 'separate'")
        self.backbone, self.shared, self.config = encoder, backbone == 'shared', encoder.config
        D = encoder.config.embed_dim
        self.adapters = nn.ModuleDict({s: nn.ModuleList([Adapter(D, tokens, reduction, groups, variant)
                                                         for _ in range(encoder.config.depth)]) for s in STREAMS})
        # `backbone` 'shared' (LAVISH): the image ViT for both modalities, the spectrogram repeated to 3 channels
        # through the image patch embedding, with sin-cos positions of its own grid; 'separate': the image and audio
        # branches each on its own modality.
        self.register_buffer('audio_pos_embed', sincos_pos_embed(D, *encoder.audio.grid), persistent=False)
        self.requires_grad_(True)

    image = property(lambda self: self.backbone.image)  # the heads read the patch grids there
    audio = property(lambda self: self.backbone.audio)

    def requires_grad_(self, requires_grad=True):
        """The adapters learn (or not); the backbone never does, whatever a head asks."""
        super().requires_grad_(requires_grad)
        self.backbone.requires_grad_(False)
        return self

    def train(self, mode=True):
        """The adapters' BatchNorms follow `mode`; the frozen backbone stays in eval mode (no drop path)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, image, audio, return_layers=False, unimodal=False):
        """The encoder's outputs (x_image, x_audio, x_fusion[, layers]), each stream adapted by the other."""
        if unimodal:
            raise ValueError("LAVISH has no uni-modal pass: its streams read each other through the adapters")
        enc = self.backbone
        image_vit, audio_vit = enc.image, enc.image if self.shared else enc.audio
        x_image = image_vit.embed(image)
        if self.shared:  # LAVISH: the spectrogram through the image patch embedding, 1 -> 3 channels
            pos = positions(self.audio_pos_embed, enc.audio, audio)  # checks audio's shape first
            x_audio = pos + image_vit.patch_embed(audio.expand(-1, 3, -1, -1))
        else:
            x_audio = audio_vit.embed(audio)
        # Fusion blocks and tokens are not used: the fusion output is constant.
        x_fusion, layers = enc.fusion_tokens.expand(x_image.shape[0], -1, -1), []
        for i, (blk_v, blk_a) in enumerate(zip(image_vit.blocks, audio_vit.blocks)):
            ad = {s: self.adapters[s][i] for s in STREAMS}
            res_v, res_a = ad['image_attn'](x_image, x_audio), ad['audio_attn'](x_audio, x_image)
            x_image = x_image + blk_v.attn(blk_v.norm1(x_image)) + res_v
            x_audio = x_audio + blk_a.attn(blk_a.norm1(x_audio)) + res_a
            res_v, res_a = ad['image_mlp'](x_image, x_audio), ad['audio_mlp'](x_audio, x_image)
            x_image = x_image + blk_v.mlp(blk_v.norm2(x_image)) + res_v
            x_audio = x_audio + blk_a.mlp(blk_a.norm2(x_audio)) + res_a
            if return_layers:
                layers.append((x_image, x_audio, x_fusion))
        out = (image_vit.norm(x_image), audio_vit.norm(x_audio), enc.fusion_norm(x_fusion))
        return (*out, layers) if return_layers else out
