"""Small helpers shared by the tests: random weights, the official fixture, key-bias entries.

tests/fixtures/ holds what the official code computed, so that a fresh clone tests parity with nothing else:
- tiny_factorized.pt: a small official pre-training model (models/avmae.py of github.com/stoneMo/DeepAVFusion,
  factorized fusion at all 3 layers, D = 64, image 64 x 64, audio 32 x 48, decoders 32 x 2), randomly
  initialised by that code, with its state dict, its config, fixed inputs and masking noise, and the official
  encoder outputs (all tokens and masked), losses and predictions for them (float32, CPU);
- keys_vitb_{token,dense,factorized}.txt: every state-dict key and shape of the official ViT-B pre-training
  model for each fusion type.
"""
import torch

from conftest import FIXTURES
from model import DeepAVFusionConfig, get_config

FIXTURE = FIXTURES / 'tiny_factorized.pt'


def small_config(**overrides):
    """The shapes of the official fixture (D=64, depth 3, image 64x64, audio 32x48): fast, non-square grids."""
    base = dict(image_size=64, audio_size=(32, 48), embed_dim=64, depth=3, num_heads=4, fusion_num_heads=4)
    return DeepAVFusionConfig(**{**base, **overrides})


def randomize(module, seed=0, scale=0.1):
    """Perturb every parameter (biases and LayerNorms too) so that no gradient or output is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def load_fixture():
    """The official tiny model, its inputs and outputs."""
    return torch.load(FIXTURE, weights_only=True)


def fixture_config(d):
    """DeepAVFusionConfig from the fixture's config dict (its decoder fields are for mae.py)."""
    return DeepAVFusionConfig(**{k: v for k, v in d['config'].items() if k in DeepAVFusionConfig.__dataclass_fields__})


def key_bias_mask(name, p):
    """Entries of parameter `name` whose true gradient is exactly zero: attention key biases, since softmax
    ignores a logit shift shared by every key: their computed gradient is rounding noise, which Adam turns
    into full-size updates, so runs that add gradients in another order (DDP) differ there. None where there
    are none."""
    if name.endswith('attn.qkv.bias'):
        m = torch.zeros_like(p, dtype=torch.bool)
        m[p.shape[0] // 3: 2 * p.shape[0] // 3] = True
        return m
    if name.endswith('kv.bias'):
        m = torch.zeros_like(p, dtype=torch.bool)
        m[: p.shape[0] // 2] = True
        return m
    if name.endswith('attn.k.bias'):
        return torch.ones_like(p, dtype=torch.bool)
    return None


__all__ = ['small_config', 'randomize', 'load_fixture', 'fixture_config', 'key_bias_mask', 'get_config']


def write_video(path, seconds=4.0, fps=10, size=(64, 48), audio=True, audio_rate=22050, video_codec='libx264',
                audio_codec='aac', volume=1.0):
    """A small video file (media.write_video). Its time can be read back from what it shows and sounds: frame k
    is a uniform grey of level `grey_at(k / fps, seconds)` with a small white square moving left to right, and
    the audio (unless `audio` is False) is a 440 Hz tone of amplitude `volume * amplitude_at(t, seconds)`."""
    import numpy as np
    from media import write_video as write
    w, h = size

    def frames():
        for k in range(int(round(seconds * fps))):
            img = np.full((h, w, 3), grey_at(k / fps, seconds), np.uint8)
            x = int(k / (seconds * fps) * (w - 8))
            img[h // 2 - 4:h // 2 + 4, x:x + 8] = 255
            yield img

    t = np.arange(int(seconds * audio_rate)) / audio_rate
    tone = (volume * amplitude_at(t, seconds) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
    return write(path, frames(), fps, tone if audio else None, audio_rate, video_codec, audio_codec)


def grey_at(t, seconds):
    """The grey level `write_video` shows at time t."""
    return int(30 + 180 * t / seconds)


def amplitude_at(t, seconds):
    """The tone's amplitude `write_video` plays at time t."""
    return 0.1 + 0.5 * t / seconds
