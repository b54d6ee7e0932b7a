"""The encoder: parity with the official model, official names and shapes, gradients, errors, loading."""
import argparse

import pytest
import torch

from conftest import FIXTURES
from helpers import fixture_config, key_bias_mask, load_fixture, randomize, small_config
from model import DeepAVFusion, DeepAVFusionConfig, get_config, parse_fusion_layers, sincos_pos_embed


# ---------------------------------------------------------------- parity with the official code

@pytest.mark.parametrize('separable', [True, False])
def test_parity_with_official_fixture(separable):
    d = load_fixture()
    model = DeepAVFusion(fixture_config(d)).eval()
    model.config.separable = separable
    for blk in model.fusion_blocks:
        blk.attn.separable = separable
    model.load_checkpoint(d['state_dict'])  # the full pre-training state dict, 'encoder.' prefix
    with torch.no_grad():
        full = model(d['image'], d['audio'])
        masked = model(d['image'], d['audio'], d['image_ids_keep'], d['audio_ids_keep'])
    for ours, official in zip(full + masked, d['encoder_out_full'] + d['encoder_out_masked']):
        assert ours.shape == official.shape
        assert (ours - official).abs().max() <= 1e-5


def test_fixed_positions_equal_official():
    """Recomputed sin-cos positions equal the official ones, also on the non-square 2 x 3 audio grid."""
    d = load_fixture()
    model = DeepAVFusion(fixture_config(d))
    for branch in ('image', 'audio'):
        official = d['state_dict'][f'encoder.{branch}.pos_embed']
        assert torch.allclose(getattr(model, branch).pos_embed, official, atol=1e-6)
    assert not any('pos_embed' in n for n, _ in model.named_parameters())


def official_keys(fusion):
    path = FIXTURES / f'keys_vitb_{fusion}.txt'
    rows = [line.split(' ', 1) for line in path.read_text().splitlines() if line and not line.startswith('#')]
    return {k[len('encoder.'):]: tuple(eval(s)) for k, s in rows if k.startswith('encoder.')}


def vitb_shapes(**overrides):
    with torch.device('meta'):  # shapes only: building ViT-B weights on the meta device costs nothing
        model = DeepAVFusion(get_config('base', **overrides))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('fusion', ['factorized', 'dense', 'token'])
def test_vitb_names_and_shapes_equal_official(fusion):
    assert vitb_shapes(fusion=fusion) == official_keys(fusion)


@pytest.mark.parametrize('fusion', ['factorized', 'dense', 'token'])
@pytest.mark.parametrize('layers', ['9-10-11', '11', '0-5', 'none'])
def test_fusion_layer_choices_keep_official_layer_indices(fusion, layers):
    """The official ModuleList holds None at layers without fusion, so keys keep the layer index."""
    ref = official_keys(fusion)
    kept = set(parse_fusion_layers(layers, 12))
    expected = {k: s for k, s in ref.items()
                if not k.startswith('fusion_blocks.') or int(k.split('.')[1]) in kept}
    assert vitb_shapes(fusion=fusion, fusion_layers=layers) == expected


def test_no_fusion_keeps_tokens_and_norm():
    shapes = vitb_shapes(fusion='none')
    assert not any(k.startswith('fusion_blocks.') for k in shapes)
    assert shapes['fusion_tokens'] == (1, 32, 768) and 'fusion_norm.weight' in shapes


def test_layers_without_fusion_run_unimodal_blocks_only():
    """fusion_layers='2': layers 0-1 see no fusion tokens; layer 2's image block sees the untouched tokens."""
    torch.manual_seed(0)
    model = randomize(DeepAVFusion(small_config(fusion='dense', fusion_layers='2'))).eval()
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        x_image, x_audio, x_fusion = model(image, audio)
        v, a = model.image.embed(image), model.audio.embed(audio)
        for i in range(2):
            v, a = model.image.blocks[i](v), model.audio.blocks[i](a)
        tokens = model.fusion_tokens.expand(2, -1, -1)
        v2 = model.image.blocks[2](torch.cat([tokens, v], 1))[:, 32:]
        f2 = model.fusion_blocks[2](tokens, v, a)
    torch.testing.assert_close(x_image, model.image.norm(v2))
    torch.testing.assert_close(x_fusion, model.fusion_norm(f2))


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize('fusion,layers', [('factorized', 'all'), ('dense', 'all'), ('token', 'all'),
                                           ('dense', '1-2'), ('factorized', '0'), ('none', 'all')])
def test_every_learnable_parameter_gets_a_gradient(fusion, layers):
    torch.manual_seed(0)
    model = randomize(DeepAVFusion(small_config(fusion=fusion, fusion_layers=layers)))
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48),
                torch.rand(2, 16).argsort(1)[:, :4], torch.rand(2, 6).argsort(1)[:, :2])
    # Random weights: a plain sum of LayerNorm outputs has zero gradient upstream (the mean is removed).
    sum((o * torch.randn(o.shape)).sum() for o in out).backward()
    largest = max(p.grad.abs().max() for p in model.parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        key_bias = key_bias_mask(name, p)
        learns = ~key_bias if key_bias is not None else torch.ones_like(p, dtype=torch.bool)
        assert (p.grad[learns] != 0).all(), f"{name} has entries with zero gradient"
        if key_bias is not None:  # key biases: the true gradient is 0, so only rounding noise is allowed
            assert p.grad[key_bias].abs().max() < 1e-5 * largest, name
    assert {n for n, _ in model.named_buffers()} == {'image.pos_embed', 'audio.pos_embed'}


# ---------------------------------------------------------------- errors

def test_wrong_fusion_name():
    with pytest.raises(ValueError, match=r"fusion='sparse': expected one of token, dense, factorized, none"):
        DeepAVFusionConfig(fusion='sparse')


@pytest.mark.parametrize('spec', ['abc', '12', '-1', '3-x', '', '1--2', '0.5'])
def test_bad_fusion_layers(spec):
    with pytest.raises(ValueError, match=r"fusion_layers=.*expected 'all', 'none' or layer indices in \[0, 12\)"):
        DeepAVFusionConfig(fusion_layers=spec)


def test_good_fusion_layers():
    assert parse_fusion_layers('11-9-10', 12) == [9, 10, 11]
    assert DeepAVFusionConfig(fusion_layers='none').fusion_layer_ids == []
    assert DeepAVFusionConfig(fusion='none').fusion_layer_ids == []


def test_bad_sizes_in_config():
    with pytest.raises(ValueError, match=r"image_size=\(70, 70\) is not a multiple of patch_size=16"):
        DeepAVFusionConfig(image_size=70)
    with pytest.raises(ValueError, match='unknown|preset'):
        get_config('huge')


def test_wrong_input_sizes():
    model = DeepAVFusion(small_config())
    audio = torch.randn(2, 1, 32, 48)
    with pytest.raises(ValueError, match=r"image input must have shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), audio)
    with pytest.raises(ValueError, match=r"audio input must have shape \(B, 1, 32, 48\), got \(2, 1, 48, 32\)"):
        model(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 48, 32))
    with pytest.raises(ValueError, match=r"image input must have shape \(B, 3, 64, 64\), got \(2, 64, 64\)"):
        model(torch.randn(2, 64, 64), audio)


def test_image_size_as_pair():
    model = DeepAVFusion(small_config(image_size=(32, 64)))
    x_image, _, _ = model(torch.randn(1, 3, 32, 64), torch.randn(1, 1, 32, 48))
    assert x_image.shape == (1, 8, 64)


def test_checkpoint_of_wrong_shape(tmp_path):
    other = DeepAVFusion(small_config(embed_dim=32, fusion='dense', fusion_layers='1-2'))
    torch.save({'model': other.state_dict()}, tmp_path / 'other.pt')
    model = DeepAVFusion(small_config())
    with pytest.raises(ValueError) as e:
        model.load_checkpoint(tmp_path / 'other.pt')
    msg = str(e.value)
    assert 'other.pt does not fit this model' in msg
    assert 'image.patch_embed.proj.weight: checkpoint (32, 3, 16, 16) vs model (64, 3, 16, 16)' in msg
    assert "fusion='dense', fusion_layers='1-2'" in msg and 'missing keys: fusion_blocks.0.' in msg


# ---------------------------------------------------------------- loading

def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('layout', ['encoder', 'pretrain', 'state_dict', 'model', 'ddp'])
def test_load_official_layouts(tmp_path, layout):
    src = randomize(DeepAVFusion(small_config()))
    enc = src.state_dict()
    full = {**{f'encoder.{k}': v for k, v in enc.items()}, 'image_decoder_embed.weight': torch.zeros(3, 64)}
    obj = {'encoder': enc, 'pretrain': full, 'state_dict': {'state_dict': full, 'epoch': 3},
           'model': {'model': enc}, 'ddp': {'state_dict': {f'module.{k}': v for k, v in full.items()}}}[layout]
    torch.save(obj, tmp_path / 'ckpt.pth')
    model = DeepAVFusion(small_config())
    model.load_checkpoint(tmp_path / 'ckpt.pth')
    assert _equal(model, src)


def test_weights_only_by_default(tmp_path):
    src = DeepAVFusion(small_config())
    torch.save({'model': src.state_dict(), 'args': argparse.Namespace(lr=1.0)}, tmp_path / 'pickled.pth')
    model = DeepAVFusion(small_config())
    with pytest.raises(ValueError, match=r"pickled.pth: refused by torch.load\(weights_only=True\)"):
        model.load_checkpoint(tmp_path / 'pickled.pth')
    model.load_checkpoint(tmp_path / 'pickled.pth', weights_only=False)  # the user's explicit choice
    assert _equal(model, src)


def mae_checkpoint(vit, grid_tokens=197):
    """An MAE-format ViT checkpoint: class token, positions for another grid, decoder and mask token."""
    sd = {k: v.clone() for k, v in vit.state_dict().items() if k != 'pos_embed'}
    D = vit.norm.weight.shape[0]
    sd.update({'cls_token': torch.randn(1, 1, D), 'pos_embed': torch.randn(1, grid_tokens, D),
               'mask_token': torch.randn(1, 1, 32), 'decoder_embed.weight': torch.randn(32, D),
               'decoder_pos_embed': torch.randn(1, grid_tokens, 32), 'decoder_blocks.0.norm1.weight': torch.ones(32)})
    return {'model': sd, 'optimizer': {}, 'epoch': 399}


@pytest.mark.parametrize('branch', ['image', 'audio'])
def test_load_mae_format_branch(tmp_path, branch):
    src = randomize(DeepAVFusion(small_config()))
    torch.save(mae_checkpoint(getattr(src, branch)), tmp_path / 'mae.pth')
    model = DeepAVFusion(small_config())
    other = 'audio' if branch == 'image' else 'image'
    before = {k: v.clone() for k, v in getattr(model, other).state_dict().items()}
    model.load_unimodal(branch, tmp_path / 'mae.pth')
    assert _equal(getattr(model, branch), getattr(src, branch))  # positions: sin-cos for this grid
    assert all(torch.equal(v, getattr(model, other).state_dict()[k]) for k, v in before.items())
    grid = getattr(model, branch).grid
    assert torch.equal(getattr(model, branch).pos_embed, sincos_pos_embed(64, *grid))


def test_mae_format_mismatch_names_keys(tmp_path):
    src = DeepAVFusion(small_config())
    ckpt = mae_checkpoint(src.image)
    ckpt['model']['fc_norm.weight'] = torch.ones(64)
    del ckpt['model']['blocks.1.attn.qkv.weight']
    torch.save(ckpt, tmp_path / 'mae.pth')
    with pytest.raises(ValueError) as e:
        DeepAVFusion(small_config()).load_unimodal('image', tmp_path / 'mae.pth')
    assert '1 missing keys: blocks.1.attn.qkv.weight' in str(e.value)
    assert '1 unexpected keys: fc_norm.weight' in str(e.value)
    torch.save(mae_checkpoint(src.image), tmp_path / 'image.pth')
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: checkpoint \(64, 3, 16, 16\) vs model "
                                         r"\(64, 1, 16, 16\)"):
        DeepAVFusion(small_config()).load_unimodal('audio', tmp_path / 'image.pth')


@pytest.mark.parametrize('system', ['deepavfusion', 'cavmae', 'avmae'])
def test_a_shorter_audio_window_is_the_full_one_with_only_its_first_columns_kept(system):
    """finetune's --audio_seconds: a spectrogram narrower by whole patches is encoded as the full-width one with only
    its first columns' patches kept (the MAE path), so a checkpoint's positions serve it unchanged."""
    from audiovisual_mae import AudiovisualMAEEncoder
    from cavmae import CAVMAEEncoder
    c = small_config()
    enc = {'deepavfusion': lambda: DeepAVFusion(c), 'cavmae': lambda: CAVMAEEncoder(c, 1),
           'avmae': lambda: AudiovisualMAEEncoder(c, 'mid', 1)}[system]()
    randomize(enc).eval()
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)  # a 2 x 3 grid of 16 x 16 patches
    first_two = torch.tensor([0, 1, 3, 4]).expand(2, -1)  # row-major: columns 0 and 1 of both rows
    with torch.no_grad():
        short = enc(image, audio[..., :32])
        masked = enc(image, audio, audio_ids_keep=first_two)
    for a, b in zip(short, masked):
        assert torch.allclose(a, b, atol=1e-6)
    assert short[1].shape[1] == 4
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 40\) \(or be narrower by whole 16-frame patches\)"):
        enc(image, audio[..., :40])
    with pytest.raises(ValueError, match=r"image input must have shape \(B, 3, 64, 64\), got \(2, 3, 64, 48\)$"):
        DeepAVFusion(c)(image[..., :48], audio)  # only audio may be narrower
