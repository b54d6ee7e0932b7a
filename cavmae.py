"""CAV-MAE (Gong et al., ICLR 2023): the contrastive audio-visual MAE DeepAVFusion is compared with (its Table 3)."""
# Here, in this project's front-end and downstream protocol: its encoder (`CAVMAEEncoder`, Eq. 2-6), its pre-training
# (`CAVMAE`, Eq. 8-9) and its contrastive term (`contrastive_loss`, Eq. 7, also for DeepAVFusion).
#
# The official code (github.com/YuanGongND/cav-mae, src/models/cav_mae.py) computes Eq. 7 visual-to-audio (for each
# image, a softmax over the batch's audios), at temperature 0.05, without a projection head, on the mean of the
# visible tokens, with the other clips of the same GPU as negatives (DataParallel, no gather). Attribute names
# follow it, so that its checkpoints load (`load_checkpoint`: the 'module.' prefix stripped, the fixed positions
# recomputed for this front-end's grids). Here both modalities use this project's front-end (3 s log-mel, 8 x 12
# audio patches, not 10 s fbank at 8 x 64); see docs/systems.md.
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import check_state_dict, read_state_dict
from mae import mae_loss, mask_both, patchify
from model import Block, PatchEmbed, init_encoder, init_weights, positions, sincos_pos_embed

NORM_EPS = 1e-5  # CAV-MAE's blocks use nn.LayerNorm's default


class JointBlock(Block):
    """CAV-MAE's block: one attention and one MLP, and a LayerNorm pair per stream: 'a' (audio alone), 'v' (image
    alone), or None (the joint stream). Every block has the three pairs, as in the official code."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__(dim, num_heads, mlp_ratio, drop_path, norm_eps=NORM_EPS)
        self.norm1_a, self.norm1_v, self.norm2_a, self.norm2_v = (nn.LayerNorm(dim, eps=NORM_EPS) for _ in range(4))

    def forward(self, x, modality=None):
        norm1, norm2 = {None: (self.norm1, self.norm2), 'a': (self.norm1_a, self.norm2_a),
                        'v': (self.norm1_v, self.norm2_v)}[modality]
        x = x + self.drop_path(self.attn(norm1(x)))
        return x + self.drop_path(self.mlp(norm2(x)))


class CAVMAEEncoder(nn.Module):
    """CAV-MAE's encoder (Eq. 2-6) with DeepAVFusion's interface: (image c^v, audio c^a, joint stream), normalised."""

    def __init__(self, config, joint_layers=1):
        super().__init__()
        c = self.config = config
        D, p, specific = c.embed_dim, c.patch_size, c.depth - joint_layers
        self.joint_layers = joint_layers
        self.patch_embed_a, self.patch_embed_v = PatchEmbed(1, D, p), PatchEmbed(3, D, p)
        shapes = {'audio': (1, tuple(c.audio_size)), 'image': (3, c.image_hw)}  # as model.ViT holds them
        self.audio, self.image = (SimpleNamespace(name=m, in_chans=k, input_size=s, grid=(s[0] // p, s[1] // p),
                                                  num_patches=s[0] * s[1] // p ** 2) for m, (k, s) in shapes.items())
        self.modality_a, self.modality_v = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer('pos_embed_a', sincos_pos_embed(D, *self.audio.grid))  # fixed (tr_pos=False)
        self.register_buffer('pos_embed_v', sincos_pos_embed(D, *self.image.grid))
        block = lambda: JointBlock(D, c.num_heads, c.mlp_ratio, c.drop_path)  # noqa: E731
        self.blocks_a, self.blocks_v = (nn.ModuleList([block() for _ in range(specific)]) for _ in range(2))
        self.blocks_u = nn.ModuleList([block() for _ in range(joint_layers)])
        self.norm_a, self.norm_v, self.norm = (nn.LayerNorm(D, eps=NORM_EPS) for _ in range(3))
        init_encoder(self, (self.patch_embed_a, self.patch_embed_v), (self.modality_a, self.modality_v))

    def forward(self, image, audio, image_ids_keep=None, audio_ids_keep=None, return_layers=False, unimodal=False):
        """Eq. 2-6 on the patches `*_ids_keep` (all if None)."""
        a = positions(self.pos_embed_a, self.audio, audio) + self.patch_embed_a(audio) + self.modality_a
        v = self.patch_embed_v(image) + self.pos_embed_v + self.modality_v
        if audio_ids_keep is not None:
            a = a.gather(1, audio_ids_keep.unsqueeze(-1).expand(-1, -1, a.shape[-1]))
        if image_ids_keep is not None:
            v = v.gather(1, image_ids_keep.unsqueeze(-1).expand(-1, -1, v.shape[-1]))
        # `return_layers` lists each layer's (image, audio, joint) tokens, joint None below the joint layers. The
        # image and audio streams never see the other modality, so `unimodal` changes nothing.
        layers = []
        for blk_a, blk_v in zip(self.blocks_a, self.blocks_v):
            a, v = blk_a(a), blk_v(v)
            layers.append((v, a, None))
        x = torch.cat([a, v], dim=1)  # the joint stream, over [audio; image]
        for blk in self.blocks_u:  # chained (the official loop re-applies the last block: the same with one)
            x, a, v = blk(x), blk(a, 'a'), blk(v, 'v')
            layers.append((v, a, x))
        out = (self.norm_v(v), self.norm_a(a), self.norm(x))
        return (*out, layers) if return_layers else out

    def load_checkpoint(self, source, weights_only=True):
        """Load CAV-MAE's encoder strictly from its checkpoints (CAVMAE or its fine-tuning model) or this project's."""
        sd = read_state_dict(source, weights_only)  # official: keys at the top level, 'module.' stripped
        if any(k.startswith('encoder.') for k in sd):  # this project's: 'encoder.*'
            sd = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')}
        # Decoder keys are left out, and the fixed positions are this front-end's.
        sd = {k: v for k, v in sd.items() if not k.startswith(('decoder', 'mask_token', 'mlp_head', 'pos_embed'))}
        sd.update(pos_embed_a=self.pos_embed_a, pos_embed_v=self.pos_embed_v)
        check_state_dict(self, sd, source)
        self.load_state_dict(sd, strict=True)


class CAVMAE(nn.Module):
    """CAV-MAE pre-training (Sec. 2.3): both modalities masked, the joint stream decoded to the masked patches."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_num_heads=16, image_mask_ratio=0.75,
                 audio_mask_ratio=0.75, norm_pix_loss=True):
        super().__init__()
        self.encoder, self.norm_pix_loss = encoder, norm_pix_loss
        self.patch_size = p = encoder.config.patch_size
        self.image_mask_ratio, self.audio_mask_ratio = image_mask_ratio, audio_mask_ratio
        D, Dd = encoder.config.embed_dim, decoder_dim
        self.decoder_embed, self.mask_token = nn.Linear(D, Dd), nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a, self.decoder_modality_v = (nn.Parameter(torch.zeros(1, 1, Dd)) for _ in range(2))
        self.register_buffer('decoder_pos_embed_a', sincos_pos_embed(Dd, *encoder.audio.grid))
        self.register_buffer('decoder_pos_embed_v', sincos_pos_embed(Dd, *encoder.image.grid))
        # The encoder's joint stream is decoded by one joint decoder over [audio; image] (Eq. 8) to the masked
        # patches (Eq. 9).
        self.decoder_blocks = nn.ModuleList([JointBlock(Dd, decoder_num_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=NORM_EPS)
        self.decoder_pred_a, self.decoder_pred_v = nn.Linear(Dd, p * p), nn.Linear(Dd, p * p * 3)
        for name, module in self.named_children():  # the encoder keeps its own (possibly loaded) weights
            if name != 'encoder':
                module.apply(init_weights)
        for t in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(t, std=0.02)

    def unshuffle(self, x, restore, m):
        """Visible tokens and mask tokens back in patch order, with modality m's ('a', 'v') positions and embedding."""
        x = torch.cat([x, self.mask_token.expand(x.shape[0], restore.shape[1] - x.shape[1], -1)], dim=1)
        pos, modality = getattr(self, f'decoder_pos_embed_{m}'), getattr(self, f'decoder_modality_{m}')
        return x.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])) + pos + modality

    def forward(self, image, audio, image_noise=None, audio_noise=None, unimodal_pass=False):
        """AVMAE.forward's dict for CAV-MAE: losses, predictions and masks per modality, 'x_image', 'x_audio',
        'x_fusion' (the joint stream), and 'u_image', 'u_audio' (the same uni-modal streams)."""
        masking = mask_both(self.encoder, image, audio, image_noise, audio_noise, self.image_mask_ratio,
                            self.audio_mask_ratio)
        (keep, mask, restore) = ({m: v[i] for m, v in masking.items()} for i in range(3))
        x_image, x_audio, x_joint = self.encoder(image, audio, keep['image'], keep['audio'])
        x, n_audio = self.decoder_embed(x_joint), keep['audio'].shape[1]
        x = torch.cat([self.unshuffle(x[:, :n_audio], restore['audio'], 'a'),
                       self.unshuffle(x[:, n_audio:], restore['image'], 'v')], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        preds = {'audio': self.decoder_pred_a(x[:, :self.encoder.audio.num_patches]),
                 'image': self.decoder_pred_v(x[:, self.encoder.audio.num_patches:])}
        # The uni-modal streams 'u_image', 'u_audio' are c^v, c^a of Eq. 4-5, on which pretrain.py puts Eq. 7.
        out = {'x_image': x_image, 'x_audio': x_audio, 'x_fusion': x_joint, 'u_image': x_image, 'u_audio': x_audio}
        for m, inputs in (('image', image), ('audio', audio)):
            target = patchify(inputs, self.patch_size).float()  # Eq. 9, in float32 under autocast
            out.update({f'loss_{m}': mae_loss(target, preds[m].float(), mask[m], self.norm_pix_loss),
                        f'pred_{m}': preds[m], f'mask_{m}': mask[m]})
        return out


def contrastive_loss(c_image, c_audio, tau=0.05, bidirectional=False, gather=False, group=0):
    """Eq. 7 on pooled features (B, D) of paired clips -> (loss, accuracy)."""
    # In float64: a loss near 0 is a difference of logits of 1 / tau, which float32 rounds away.
    v, a = F.normalize(c_image.double(), dim=-1), F.normalize(c_audio.double(), dim=-1)
    # Negatives: the other clips of this process (the official code's, per GPU), of consecutive groups of `group`
    # clips (the official contrastive batch on any number of processes, as they would share the batch out; 0: the
    # whole batch), or with `gather` of every process (all_gather with gradients).
    if gather and dist.is_initialized():
        v, a = torch.cat(dist_fn.all_gather(v)), torch.cat(dist_fn.all_gather(a))
    n = group or len(v)
    if len(v) % n:
        raise ValueError(f"contrastive negatives in groups of {n} clips: the batch of {len(v)} does not divide")
    # Clip i in group i mod (B / n): the clips torchrun's processes would share out (training.RunSampler).
    v, a = (x.view(n, -1, x.shape[-1]).transpose(0, 1) for x in (v, a))
    # -mean_i log softmax_j(cos(v_i, a_j) / tau)[i]: visual anchors over audios (the official direction), or with
    # `bidirectional` the mean of both directions.
    logits = v @ a.transpose(1, 2) / tau  # (groups, images, audios)
    target = torch.arange(n, device=v.device).expand(len(v), n)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    if bidirectional:
        loss = (loss + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.flatten())) / 2
    # The accuracy is the fraction of images whose nearest audio is theirs.
    return loss.float(), (logits.argmax(-1) == target).float().mean()
