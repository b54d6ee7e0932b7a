"""Audiovisual MAE (Georgescu et al., ICCV 2023), in this project's front-end and protocol."""
# Its fusion is a choice of encoder (`AudiovisualMAEEncoder`, its Sec. 3.2) and decoder (`AudiovisualMAE`, Sec. 3.3);
# run it with pretrain.py --system avmae.
#
# As its code (google-research/scenic, projects/av_mae): no class or modality tokens, zero-initialised mask tokens
# and output projections, (audio, image) order, raw targets weighted 0.5 / 0.5; but one frame (16 x 16 patches, not
# tubelets) with fixed 2-D sin-cos positions, and int(n (1 - p)) patches kept: docs/systems.md.
import torch
import torch.nn as nn

from mae import mae_loss, mask_both, patchify
from model import Block, DeepAVFusion, ViT, init_encoder, init_weights, sincos_pos_embed

ENCODERS = ('early', 'separate', 'shared', 'mid')
DECODERS = ('shared', 'separate', 'joint')
OBJECTIVES = ('joint', 'inpaint_image', 'inpaint_audio', 'inpaint_both')


class AudiovisualMAEEncoder(nn.Module):
    """Its encoders with DeepAVFusion's interface: (image, audio, joint tokens), normalised."""

    def __init__(self, config, encoder='mid', joint_layers=2):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"--avmae_encoder must be one of {ENCODERS}, got {encoder!r}")
        c = self.config = config
        self.kind = encoder
        if encoder == 'mid' and not 0 < joint_layers < c.depth:
            raise ValueError(f"--joint_layers {joint_layers}: mid-fusion needs between 1 and {c.depth - 1} joint "
                             f"layers of the {c.depth}")
        self.joint_layers = {'early': c.depth, 'mid': joint_layers}.get(encoder, 0)  # S
        vit = dict(patch_size=c.patch_size, dim=c.embed_dim, depth=c.depth - self.joint_layers, num_heads=c.num_heads,
                   mlp_ratio=c.mlp_ratio, drop_path=c.drop_path)
        self.image, self.audio = ViT('image', 3, c.image_hw, **vit), ViT('audio', 1, c.audio_size, **vit)
        if encoder == 'shared':  # one transformer for both modalities: its blocks and final LayerNorm tied
            self.audio.blocks, self.audio.norm = self.image.blocks, self.image.norm
        if encoder == 'early':  # no modality-specific layers, so no LayerNorm before the joint stack
            self.image.norm, self.audio.norm = nn.Identity(), nn.Identity()
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.drop_path)
                                     for _ in range(self.joint_layers)])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6) if self.joint_layers else nn.Identity()
        init_encoder(self, (self.image.patch_embed, self.audio.patch_embed), ())

    def forward(self, image, audio, image_ids_keep=None, audio_ids_keep=None, return_layers=False, unimodal=False):
        """The encoder on the patches `*_ids_keep` (all if None); `return_layers` adds each layer's tokens."""
        # Each layer's (image, audio, joint) tokens, unnormalised; joint None in the modality-specific layers.
        v, a = self.image.embed(image, image_ids_keep), self.audio.embed(audio, audio_ids_keep)
        # `unimodal`: the streams before any joint layer (mid: at the junction); early fusion has none.
        if unimodal and self.kind == 'early':
            raise ValueError("--avmae_encoder early has no uni-modal stream: every layer reads both modalities "
                             "(use separate, shared or mid for retrieval or a contrastive term)")
        layers = []
        for blk_v, blk_a in zip(self.image.blocks, self.audio.blocks):
            v, a = blk_v(v), blk_a(a)
            layers.append((v, a, None))
        v, a = self.image.norm(v), self.audio.norm(a)  # mid-fusion: the LayerNorm at the junction
        # Early and mid-fusion split the joint stack's output per modality; separate and shared return the two
        # streams side by side as the joint.
        x = torch.cat([a, v], dim=1)
        if not unimodal:
            for blk in self.blocks:
                x = blk(x)
                layers.append((x[:, a.shape[1]:], x[:, :a.shape[1]], x))
            x = self.norm(x)
            a, v = x[:, :a.shape[1]], x[:, a.shape[1]:]
        return (v, a, x, layers) if return_layers else (v, a, x)

    # This project's checkpoints of it load as DeepAVFusion's do: strictly, from a file or its 'encoder.*' keys.
    load_checkpoint = DeepAVFusion.load_checkpoint


class AudiovisualMAE(nn.Module):
    """Its pre-training: masking, the encoder, the `decoder`, per target the squared error on its scored patches."""

    def __init__(self, encoder, decoder_dim=384, decoder_depth=4, decoder_num_heads=6, image_mask_ratio=0.9,
                 audio_mask_ratio=0.5, norm_pix_loss=False, decoder='shared', objective='joint'):
        super().__init__()
        if decoder not in DECODERS or objective not in OBJECTIVES:
            raise ValueError(f"--avmae_decoder must be one of {DECODERS} and --avmae_objective one of {OBJECTIVES}")
        if encoder.kind == 'separate' and decoder == 'separate':  # its Sec. 3.3 and configs' assertion
            raise ValueError("--avmae_encoder separate with --avmae_decoder separate: two uncoupled MAEs, nothing "
                             "joins the modalities (Audiovisual MAE Sec. 3.3 rules it out); choose another decoder")
        self.encoder, self.decoder_kind, self.norm_pix_loss = encoder, decoder, norm_pix_loss
        self.image_mask_ratio, self.audio_mask_ratio = image_mask_ratio, audio_mask_ratio
        self.patch_size = p = encoder.config.patch_size
        n = {m: getattr(encoder, m).num_patches for m in ('image', 'audio')}
        visible = {'image': int(n['image'] * (1 - image_mask_ratio)), 'audio': int(n['audio'] * (1 - audio_mask_ratio))}
        if not all(visible.values()):
            raise ValueError(f"--image_mask_ratio {image_mask_ratio} / --audio_mask_ratio {audio_mask_ratio} leave "
                             f"{visible['image']} of {n['image']} image and {visible['audio']} of {n['audio']} audio "
                             f"patches visible: the encoder needs at least one of each")
        # 'joint' (Eq. 1) scores each modality's hidden patches; 'inpaint_*' decodes a target from the other
        # modality's visible tokens (laid out in `decoder_input`).
        self.targets = {'joint': ('image', 'audio'), 'inpaint_image': ('image',), 'inpaint_audio': ('audio',),
                        'inpaint_both': ('image', 'audio')}[objective]
        self.inpaint = objective != 'joint'
        for m, other in (('image', 'audio'), ('audio', 'image')):
            if self.inpaint and m in self.targets and visible[other] >= n[m]:
                raise ValueError(f"--avmae_objective {objective}: the {m} ({n[m]} patches) cannot be inpainted from "
                                 f"the {visible[other]} visible {other} tokens, which would fill every slot; raise "
                                 f"--{other}_mask_ratio")
        D, Dd = encoder.config.embed_dim, decoder_dim
        self.decoder_projection = nn.ModuleDict({m: nn.Linear(D, Dd) for m in n})
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, Dd)) for m in n})
        for m in n:
            self.register_buffer(f'decoder_pos_{m}', sincos_pos_embed(Dd, *getattr(encoder, m).grid))
        stack = lambda: nn.Sequential(*[Block(Dd, decoder_num_heads) for _ in range(decoder_depth)],  # noqa: E731
                                      nn.LayerNorm(Dd, eps=1e-6))
        first = stack()  # 'shared': the same weights applied to each modality's sequence, no cross-attention
        self.decoders = nn.ModuleDict({'joint': first} if decoder == 'joint' else
                                      {'image': first, 'audio': stack() if decoder == 'separate' else first})
        self.output_projection = nn.ModuleDict({'image': nn.Linear(Dd, p * p * 3), 'audio': nn.Linear(Dd, p * p)})
        for name, module in self.named_children():  # the encoder keeps its own weights
            if name != 'encoder':
                module.apply(init_weights)
        for head in self.output_projection.values():  # zero kernels, as its code
            nn.init.zeros_(head.weight)

    def decoder_input(self, m, tokens, restore):
        """Modality m's decoder sequence and the mask of its scored slots: the visible tokens and mask tokens back
        in patch order (joint reconstruction), or the other modality's tokens first (inpainting); positions."""
        # Inpainting lays the sequence out as its code: the other modality's visible tokens in the first u slots, the
        # target's mask token in the rest, slot k scored against patch k, the first u not scored.
        B, L = restore.shape
        source = ('audio' if m == 'image' else 'image') if self.inpaint else m
        x = self.decoder_projection[source](tokens[source])
        u = x.shape[1]
        x = torch.cat([x, self.mask_token[m].expand(B, L - u, -1)], dim=1)
        if self.inpaint:
            scored = torch.cat([torch.zeros(B, u), torch.ones(B, L - u)], dim=1).to(x.device)
        else:
            x, scored = x.gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])), None
        return x + getattr(self, f'decoder_pos_{m}'), scored

    def forward(self, image, audio, image_noise=None, audio_noise=None, unimodal_pass=False):
        """AVMAE.forward's dict: 'loss_*', 'pred_*', 'mask_*' (1 on the scored patches) for each target modality,
        the encoder's 'x_image', 'x_audio', 'x_fusion', and with `unimodal_pass` 'u_*' (AudiovisualMAEEncoder)."""
        masking = mask_both(self.encoder, image, audio, image_noise, audio_noise, self.image_mask_ratio,
                            self.audio_mask_ratio)
        keep = (masking['image'][0], masking['audio'][0])
        x_image, x_audio, x_joint = self.encoder(image, audio, *keep)
        out = {'x_image': x_image, 'x_audio': x_audio, 'x_fusion': x_joint}
        if unimodal_pass:
            out['u_image'], out['u_audio'], _ = self.encoder(image, audio, *keep, unimodal=True)
        seqs = {m: self.decoder_input(m, {'image': x_image, 'audio': x_audio}, masking[m][2]) for m in self.targets}
        if self.decoder_kind == 'joint':  # one decoder over the concatenation, (audio, image) as the encoder
            order = [m for m in ('audio', 'image') if m in seqs]
            x = self.decoders['joint'](torch.cat([seqs[m][0] for m in order], dim=1))
            decoded = dict(zip(order, x.split([seqs[m][0].shape[1] for m in order], dim=1)))
        else:
            decoded = {m: self.decoders[m](seqs[m][0]) for m in seqs}
        for m in self.targets:
            pred = self.output_projection[m](decoded[m])
            mask = masking[m][1] if seqs[m][1] is None else seqs[m][1]
            target = patchify(image if m == 'image' else audio, self.patch_size).float()
            out.update({f'loss_{m}': mae_loss(target, pred.float(), mask, self.norm_pix_loss),
                        f'pred_{m}': pred, f'mask_{m}': mask})
        return out
