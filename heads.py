"""The heads of the downstream tasks (paper App. A) on the DeepAVFusion encoder; finetune.py picks one by --task."""
# Classifier, Localizer, Segmenter, Separator (and MixAndSeparate), in the official code's layouts (models/*.py).
import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from data import HOP, N_FFT, N_MELS, SAMPLE_RATE
from model import init_weights, pooled


def token_grid(x, grid):
    """(B, gh * w, D) tokens -> (B, D, gh, w) feature map; w follows from the tokens (narrower audio is finetune's
    --audio_seconds)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], -1)


class Classifier(nn.Module):
    """Linear classification of pooled features, the encoder fixed with `frozen`; `input_norm`: each feature first
    standardised (BatchNorm, no affine: the official probe); one head on the joined features, or with `per_feature`
    one per feature, logits averaged (the official AVClassifier); forward(..., each=True) adds each head's logits."""

    def __init__(self, encoder, feats, num_outputs, frozen, input_norm=False, per_feature=False):
        super().__init__()
        self.encoder, self.feats, self.frozen = encoder, list(feats), frozen
        self.encoder.requires_grad_(not frozen)
        D = encoder.config.embed_dim
        self.norms = nn.ModuleDict({f: nn.BatchNorm1d(D, affine=False, eps=1e-6) for f in self.feats}) \
            if input_norm else None
        if per_feature:
            self.heads = nn.ModuleDict({f: nn.Linear(D, num_outputs) for f in self.feats})
        else:
            self.head, self.heads = nn.Linear(len(self.feats) * D, num_outputs), None
        for head in self.linear_heads():
            init_weights(head)

    def linear_heads(self):
        """The linear layers that classify: one, or one per feature."""
        return list(self.heads.values()) if self.heads is not None else [self.head]

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:  # a probe never changes the encoder, not even its dropout state
            self.encoder.eval()
        return self

    def forward(self, image, audio, each=False):
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            feats = pooled(self.encoder(image, audio))
        if self.norms is not None:
            feats = {f: self.norms[f](feats[f]) for f in self.feats}
        if self.heads is None:
            logits = self.head(torch.cat([feats[f] for f in self.feats], dim=-1))
            return (logits, {}) if each else logits
        per_head = {f: self.heads[f](feats[f]) for f in self.feats}
        logits = torch.stack(list(per_head.values())).mean(0)
        return (logits, per_head) if each else logits


class Localizer(nn.Module):
    """Sound-source localization (App. A): the cosine similarity of the global audio feature with each local image
    feature, a map that a learned scale and offset turn into per-pixel logits."""

    # Both learn at `lr_scales` x the lr, as Adam moves a parameter about its lr per step (at 1e-4 they would barely
    # leave 10 and 0: results/avdigits.md).
    lr_scales = {'scale': 100.0, 'offset': 100.0}

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.scale, self.offset = nn.Parameter(torch.tensor(10.0)), nn.Parameter(torch.tensor(0.0))

    def forward(self, image, audio):
        x_image, x_audio, _ = self.encoder(image, audio)
        sim = torch.einsum('bd,bnd->bn', F.normalize(x_audio.mean(1), dim=-1), F.normalize(x_image, dim=-1))
        logits = self.scale * token_grid(sim.unsqueeze(-1), self.encoder.image.grid) + self.offset
        return F.interpolate(logits, size=image.shape[-2:], mode='bilinear', align_corners=False)[:, 0]


class DoubleConv(nn.Sequential):
    """(3x3 convolution, BatchNorm, ReLU) twice: the U-Net stage."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Transposed convolution (x factor, channels / factor), then concatenate a skip input, then DoubleConv."""

    def __init__(self, cin, cout, factor=2, skip=0):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // factor, kernel_size=factor, stride=factor)
        self.conv = DoubleConv(cin // factor + skip, cout)

    def forward(self, x, skip=None):
        x = self.up(x)
        return self.conv(x if skip is None else torch.cat([x, skip], dim=1))

def spread(v, like):
    """(B, C) -> (B, C, H, W) with the spatial size of `like`."""
    return v[:, :, None, None].expand(-1, -1, *like.shape[-2:])


def layer_ids(depth, n):
    """n encoder layers spread evenly from the first to the last (floor), as the official heads pick them."""
    # E.g. depth 12 -> (0, 3, 7, 11) for 4, (0, 2, 5, 8, 11) for 5.
    return np.linspace(0, depth - 1, n).astype(int).tolist()


class Segmenter(nn.Module):
    """Audio-visual segmentation head (AVSBench protocol, the official head's layout): image tokens of four depths, each
    joined by the projected global audio feature, the deeper ones upsampled x2, x4, x8 and merged; a final x2."""

    def __init__(self, encoder, num_outputs):
        super().__init__()
        self.encoder, D = encoder, encoder.config.embed_dim
        self.layers = layer_ids(encoder.config.depth, 4)
        dims = [max(128, D // s) for s in (1, 2, 4, 8)]
        self.norm_v = nn.ModuleList([nn.LayerNorm(D) for _ in dims])
        self.proj_a = nn.ModuleList([nn.Sequential(nn.Linear(D, d), nn.LayerNorm(d)) for d in dims])
        self.top = DoubleConv(D + dims[0], dims[0])
        self.lat = nn.ModuleList([Up(D, dims[i], factor=2 ** i) for i in (1, 2, 3)])
        self.up = nn.ModuleList([Up(dims[i], dims[i + 1], skip=2 * dims[i + 1]) for i in (0, 1, 2)])
        self.pred = nn.Sequential(nn.Conv2d(dims[-1], 128, 3, padding=1), nn.Upsample(scale_factor=2, mode='bilinear'),
                                  nn.Conv2d(128, num_outputs, 3, padding=1))
        for m in (self.norm_v, self.proj_a, self.top, self.lat, self.up, self.pred):
            m.apply(init_weights)

    def forward(self, image, audio):
        _, _, _, layers = self.encoder(image, audio, return_layers=True)
        xv = [token_grid(norm(layers[i][0]), self.encoder.image.grid) for norm, i in zip(self.norm_v, self.layers)]
        xa = [proj(layers[-1][1]).mean(1) for proj in self.proj_a]  # the final audio tokens, pooled
        x = self.top(torch.cat([xv[0], spread(xa[0], xv[0])], dim=1))
        for lat, up, v, a in zip(self.lat, self.up, xv[1:], xa[1:]):
            v = lat(v)
            x = up(x, torch.cat([v, spread(a, v)], dim=1))
        return self.pred(x)


class Separator(nn.Module):
    """Mix-and-separate U-Net on the mixture's audio tokens of five depths (deepest first), told the target by its
    image's pooled feature: `condition` 'concat' (the official head's layout), the feature projected and concatenated
    as channels at every U-Net stage; 'channels' (Sound of Pixels, Zhao et al. 2018), the U-Net blind to the picture
    and ending in K = D / 16 channels that the feature weights into the mask (mask logit = sum_k v_k a_k + b)."""

    def __init__(self, encoder, condition='concat'):
        super().__init__()
        self.encoder, D = encoder, encoder.config.embed_dim
        self.condition, c = condition, int(condition == 'concat')  # c: a stage's input doubled by its condition
        self.layers = layer_ids(encoder.config.depth, 5)[::-1]
        self.norm_a, self.norm_v = nn.ModuleList([nn.LayerNorm(D) for _ in range(5)]), nn.LayerNorm(D)
        self.cond = nn.ModuleList([nn.Linear(D, D // 2 ** k) for k in range(5)] if c else [nn.Linear(D, D // 16)])
        self.top = DoubleConv((1 + c) * D, D)
        self.lat = nn.ModuleList([Up(D, D // 2 ** k, factor=2 ** k) for k in range(1, 5)])
        self.up = nn.ModuleList([Up(D // 2 ** (k - 1), D // 2 ** k, skip=(1 + c) * D // 2 ** k) for k in range(1, 5)])
        self.pred = nn.Conv2d(D // 16, 1 if c else D // 16, 3, padding=1)
        self.bias = None if c else nn.Parameter(torch.zeros(1))  # 'channels': the mask's bias (SoP's synthesizer)
        for m in (self.norm_a, self.norm_v, self.cond, self.top, self.lat, self.up, self.pred):
            m.apply(init_weights)

    def forward(self, image, audio):
        _, _, _, layers = self.encoder(image, audio, return_layers=True)
        xa = [token_grid(norm(layers[i][1]), self.encoder.audio.grid) for norm, i in zip(self.norm_a, self.layers)]
        xv = self.norm_v(layers[-1][0]).mean(1)
        if self.condition == 'channels':
            x = self.top(xa[0])
            for lat, up, a in zip(self.lat, self.up, xa[1:]):
                x = up(x, lat(a))
            return torch.einsum('bkhw,bk->bhw', self.pred(x), self.cond[0](xv)) + self.bias
        x = self.top(torch.cat([xa[0], spread(self.cond[0](xv), xa[0])], dim=1))
        for lat, up, cond, a in zip(self.lat, self.up, self.cond[1:], xa[1:]):
            a = lat(a)
            x = up(x, torch.cat([a, spread(cond(xv), a)], dim=1))
        return self.pred(x)[:, 0]

# ---------------------------------------------------------------------------------------------------- separation

class MixAndSeparate:
    """Spectrogram side of mix-and-separate: a mixture's log-mel input, target mask and loss weight; its separation."""

    def __init__(self, device):
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP,
                                                        n_mels=N_MELS).to(device)
        self.window = torch.hann_window(N_FFT, device=device)
        # Mask on mel bands -> mask on STFT bins: each bin takes the mask at its position on the mel axis.
        fb = torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE)
        centres = (fb * torch.arange(N_FFT // 2 + 1)[:, None]).sum(0) / fb.sum(0).clamp_min(1e-8)
        pos = torch.from_numpy(np.interp(np.arange(N_FFT // 2 + 1), centres.numpy(), np.arange(N_MELS))).float()
        lo = pos.floor().long().clamp(max=N_MELS - 1)
        hi, w = (lo + 1).clamp(max=N_MELS - 1), (pos - lo).unsqueeze(1)
        self.mel_to_linear = (F.one_hot(lo, N_MELS) * (1 - w) + F.one_hot(hi, N_MELS) * w).to(device)

    def power(self, waveform):
        """(B, samples) -> mel power (B, 128, 192), the last frame dropped as in the front-end."""
        return self.mel(waveform)[..., :-1]

    def inputs(self, target, other, mask='binary'):
        """Mixture of target and other clip -> (log-mel input (B, 1, 128, 192), target mask, loss weight). The
        mask: 'binary', 1 where the target's power exceeds the other clip's; 'ratio', the official ratio mask
        (models/avsrcsep.py, binary_mask=False): target / (target + mixture) power."""
        # 'ratio' reads the powers back from log10(power + 1e-7), as the official code; it is about 1/2 where the
        # target dominates, as the mixture holds it.
        with torch.autocast(target.device.type, enabled=False):  # spectrograms in float32
            p_t, p_o, p_mix = self.power(target.float()), self.power(other.float()), self.power(target + other)
        if mask == 'ratio':
            s, m = p_t + 1e-7, p_mix + 1e-7
            goal = (s / (s + m + 1e-5)).clamp(0, 1)
        else:
            goal = (p_t > p_o).float()
        return (torch.log10(p_mix + 1e-7).unsqueeze(1), goal,
                torch.log1p(p_mix).clamp(1e-3, 10))  # weights: the official weighted loss

    def separate(self, mask_logits, mixture):
        """Predicted mel mask (B, 128, 192) -> waveform: the mask on the mixture's STFT, the mixture's phase."""
        with torch.autocast(mixture.device.type, enabled=False):
            spec = torch.stft(mixture.float(), N_FFT, HOP, window=self.window, return_complex=True)  # (B, 401, 193)
            mask = torch.einsum('fm,bmt->bft', self.mel_to_linear, torch.sigmoid(mask_logits.float()))
            mask = torch.cat([mask, mask[..., -1:]], dim=-1)  # the frame the front-end dropped
            return torch.istft(spec * mask, N_FFT, HOP, window=self.window, length=mixture.shape[-1])
