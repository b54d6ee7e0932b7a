"""Small helpers shared by the tests: random weights, the fixture's configuration, key-bias entries."""
import pytest
import torch

from conftest import SHARED
from model import DeepAVFusionConfig, get_config

FIXTURE = SHARED / 'reference' / 'tiny_factorized.pt'


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
    """The official tiny model, its inputs and outputs; skips the test where ../shared is absent."""
    if not FIXTURE.exists():
        pytest.skip(f"needs the official reference model {FIXTURE} (../shared is not beside this checkout)")
    return torch.load(FIXTURE, weights_only=True)


def fixture_config(d):
    """DeepAVFusionConfig from the fixture's config dict (its decoder fields are for mae.py)."""
    return DeepAVFusionConfig(**{k: v for k, v in d['config'].items() if k in DeepAVFusionConfig.__dataclass_fields__})


def key_bias_mask(name, p):
    """Entries of parameter `name` whose true gradient is exactly zero: attention key biases, since softmax
    ignores a logit shift shared by every key (GUIDE.md section 7). None where there are none."""
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
