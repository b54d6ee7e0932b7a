"""Audio-visual masked auto-encoder around the DeepAVFusion encoder (paper Sec. 3.2, Eq. 14-16)."""
# Both inputs are cut into patches and most of them are hidden (75% of image, 80% of audio patches, per sample).
# The encoder sees only the visible patches (Eq. 15); a decoder per modality, which also sees the fusion tokens,
# fills in the hidden patches, and the loss is the mean squared error on the hidden patches only (Eq. 14), image
# plus audio (Eq. 16). Names and shapes follow the official code, so its pre-training checkpoints load strictly.
import torch
import torch.nn as nn

from model import Block, DeepAVFusion, init_weights, sincos_pos_embed

DECODER_NORM_EPS = 1e-5  # the official decoders use nn.LayerNorm's default eps


def random_masking(noise, mask_ratio):
    """Per-sample masking from noise (B, L), as MAE does: the int(L * (1 - ratio)) patches with the lowest noise
    stay visible. Returns ids_keep (B, n_keep), mask (B, L) with 1 on hidden patches, ids_restore (B, L)."""
    B, L = noise.shape
    n_keep = int(L * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :n_keep] = 0
    return ids_shuffle[:, :n_keep], mask.gather(1, ids_restore), ids_restore


def mask_both(encoder, image, audio, image_noise, audio_noise, image_ratio, audio_ratio):
    """random_masking per modality: {'image': (ids_keep, mask, ids_restore), 'audio': ...}; noise drawn if None."""
    pairs = (('image', image, image_noise, image_ratio), ('audio', audio, audio_noise, audio_ratio))
    return {m: random_masking(torch.rand(x.shape[0], getattr(encoder, m).num_patches, device=x.device)
                              if noise is None else noise, ratio) for m, x, noise, ratio in pairs}


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), pixels of a patch in (row, column, channel) order."""
    (B, C, H, W), p = x.shape, patch_size
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum('bchpwq->bhwpqc', x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, grid, patch_size, channels):
    """(B, gh * gw, p * p * C) -> (B, C, gh * p, gw * p), the inverse of `patchify`."""
    B, (gh, gw), p = x.shape[0], grid, patch_size
    x = x.reshape(B, gh, gw, p, p, channels)
    return torch.einsum('bhwpqc->bchpwq', x).reshape(B, channels, gh * p, gw * p)


def mae_loss(target, pred, mask, norm_pix_loss=True):
    """Eq. 14: mean squared error per patch, averaged over the hidden patches only. With `norm_pix_loss` each
    target patch is normalised by its own mean and (unbiased) variance, as in MAE."""
    if norm_pix_loss:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


class AVMAE(nn.Module):
    """The audio-visual MAE of Sec. 3.2: random masking, the encoder, two decoders, the loss of Eq. 16 (with one
    of `modalities`, a uni-modal MAE: MAE, AudioMAE)."""

    def __init__(self, encoder: DeepAVFusion, decoder_dim=512, decoder_depth=8, decoder_num_heads=16,
                 image_mask_ratio=0.75, audio_mask_ratio=0.8, norm_pix_loss=True, modalities=('image', 'audio')):
        super().__init__()
        self.encoder = encoder
        self.image_mask_ratio, self.audio_mask_ratio = image_mask_ratio, audio_mask_ratio
        self.norm_pix_loss, self.modalities = norm_pix_loss, tuple(modalities)
        self.patch_size = p = encoder.config.patch_size
        D, Dd = encoder.config.embed_dim, decoder_dim
        # Flat attribute names, as in the official code (image_decoder_embed, ...), so its checkpoints load strictly.
        for m, channels in (('image', 3), ('audio', 1)):
            setattr(self, f'{m}_decoder_embed', nn.Linear(D, Dd))
            setattr(self, f'{m}_decoder_mask_token', nn.Parameter(torch.zeros(1, 1, Dd)))
            # Sin-cos initialised and trainable (weight-decayed, 3-D): the official code's comment says fixed, but
            # its parameter has requires_grad=True, and AdamW decays it; a checkpoint saved either way loads.
            setattr(self, f'{m}_decoder_pos_embed', nn.Parameter(sincos_pos_embed(Dd, *getattr(encoder, m).grid)))
            blocks = [Block(Dd, decoder_num_heads, 4.0, norm_eps=DECODER_NORM_EPS) for _ in range(decoder_depth)]
            setattr(self, f'{m}_decoder_blocks', nn.ModuleList(blocks))
            setattr(self, f'{m}_decoder_norm', nn.LayerNorm(Dd, eps=DECODER_NORM_EPS))
            setattr(self, f'{m}_decoder_pred', nn.Linear(Dd, p * p * channels))

        for name, module in self.named_children():  # the encoder keeps its own (possibly pre-trained) weights
            if name != 'encoder':
                module.apply(init_weights)
        nn.init.normal_(self.image_decoder_mask_token, std=0.02)
        nn.init.normal_(self.audio_decoder_mask_token, std=0.02)

    def decode(self, modality, x, x_fusion, ids_restore):
        """Decoder g_v or g_a (Eq. 16): visible tokens and mask tokens back in patch order, with positions,
        behind the fusion tokens; 8 blocks; the fusion tokens are dropped and each patch is predicted."""
        part = lambda name: getattr(self, f'{modality}_decoder_{name}')  # noqa: E731
        x, x_fusion = part('embed')(x), part('embed')(x_fusion)
        B, n_visible, Dd = x.shape
        x = torch.cat([x, part('mask_token').expand(B, ids_restore.shape[1] - n_visible, -1)], dim=1)
        x = x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # unshuffle
        x = torch.cat([x_fusion, x + part('pos_embed')], dim=1)
        for blk in part('blocks'):
            x = blk(x)
        return part('pred')(part('norm')(x[:, x_fusion.shape[1]:]))

    def forward(self, image, audio, image_noise=None, audio_noise=None, unimodal_pass=False):
        """Mask, encode the visible patches, decode and score each of `modalities` (Eq. 14-15). Returns 'loss_*',
        'pred_*' (B, L, p * p * C), 'mask_*' (B, L; 1 hidden), 'x_image', 'x_audio', 'x_fusion'[, 'u_*']."""
        # The patches of lowest noise stay visible (noise (B, L) drawn if None). The dict holds what a loss term may
        # need: 'loss_*' (Eq. 14; their sum is Eq. 16), the encoder's tokens of the visible patches 'x_*' (Eq. 15)
        # and, with `unimodal_pass`, 'u_*': the branches alone on them.
        masking = mask_both(self.encoder, image, audio, image_noise, audio_noise, self.image_mask_ratio,
                            self.audio_mask_ratio)
        keep = (masking['image'][0], masking['audio'][0])
        x_image, x_audio, x_fusion = self.encoder(image, audio, *keep)  # Eq. 15
        out = {'x_image': x_image, 'x_audio': x_audio, 'x_fusion': x_fusion}
        if unimodal_pass:
            out['u_image'], out['u_audio'], _ = self.encoder(image, audio, *keep, unimodal=True)
        for m, x in (('image', x_image), ('audio', x_audio)):
            if m in self.modalities:  # a uni-modal MAE's decoder sees no fusion tokens
                _, mask, restore = masking[m]
                pred = self.decode(m, x, x_fusion if len(self.modalities) == 2 else x_fusion[:, :0], restore)
                target = patchify(image if m == 'image' else audio, self.patch_size).float()  # Eq. 14, float32
                out.update({f'loss_{m}': mae_loss(target, pred.float(), mask, self.norm_pix_loss),
                            f'pred_{m}': pred, f'mask_{m}': mask})
        return out
