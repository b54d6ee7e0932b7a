"""Every initialisation checked against its own model code: state dicts laid out as MAE's models_mae.py /
models_vit.py, AudioMAE's (time-first patches) and CAV-MAE's cav_mae.py write them, random weights from a small
generator here (no network, no file copied), loaded through the project's readers; the branch's outputs equal the
original computation's on the same input. The official DeepAVFusion is checked against its own outputs in
test_model.py (tests/fixtures/tiny_factorized.pt). Also: checkpoints.py's report of what a file is."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
from cavmae import CAVMAEEncoder
from model import DeepAVFusion, get_config, is_audiomae, sincos_pos_embed

D, HEADS, DEPTH = 32, 2, 2


def config(**kw):
    return get_config('tiny', image_size=64, embed_dim=D, depth=DEPTH, num_heads=HEADS, fusion_num_heads=HEADS, **kw)


# ---------------------------------------------------------------- the original layouts and computations

def mae_sincos(dim, gh, gw):
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed (numpy), written from its description: the grid is
    meshgrid(w, h), the first half of the channels from grid[0] (columns), each half [sin, cos]."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), axis=0)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def timm_vit_state(g, prefix, in_chans, n_pos, depth=DEPTH, cls=True):
    """A timm / MAE ViT encoder's tensors: patch_embed.proj, cls_token, pos_embed, blocks.i.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, random."""
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {f'{prefix}patch_embed.proj.weight': r(D, in_chans, 16, 16), f'{prefix}patch_embed.proj.bias': r(D)}
    if cls:
        sd.update({f'{prefix}cls_token': r(1, 1, D), f'{prefix}pos_embed': r(1, n_pos, D)})
    for i in range(depth):
        b = f'{prefix}blocks.{i}.'
        sd.update({b + 'norm1.weight': 1 + r(D), b + 'norm1.bias': r(D), b + 'attn.qkv.weight': r(3 * D, D),
                   b + 'attn.qkv.bias': r(3 * D), b + 'attn.proj.weight': r(D, D), b + 'attn.proj.bias': r(D),
                   b + 'norm2.weight': 1 + r(D), b + 'norm2.bias': r(D), b + 'mlp.fc1.weight': r(4 * D, D),
                   b + 'mlp.fc1.bias': r(4 * D), b + 'mlp.fc2.weight': r(D, 4 * D), b + 'mlp.fc2.bias': r(D)})
    return sd


def timm_block(sd, b, x, norm1='norm1', norm2='norm2', eps=1e-6):
    """timm's Block as MAE and CAV-MAE run it: qkv reshaped (B, N, 3, heads, d).permute(2, 0, 3, 1, 4), scores
    q k^T * d^-0.5, softmax, proj; then the MLP with exact GELU."""
    ln = lambda x, n: F.layer_norm(x, (D,), sd[f'{b}{n}.weight'], sd[f'{b}{n}.bias'], eps)  # noqa: E731
    B, N, _ = x.shape
    h = ln(x, norm1)
    qkv = F.linear(h, sd[b + 'attn.qkv.weight'], sd[b + 'attn.qkv.bias'])
    q, k, v = qkv.reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(B, N, D), sd[b + 'attn.proj.weight'], sd[b + 'attn.proj.bias'])
    h = F.gelu(F.linear(ln(x, norm2), sd[b + 'mlp.fc1.weight'], sd[b + 'mlp.fc1.bias']))
    return x + F.linear(h, sd[b + 'mlp.fc2.weight'], sd[b + 'mlp.fc2.bias'])


def mae_encoder(sd, x, pos, prefix=''):
    """models_mae.forward_encoder at mask ratio 0 without its class token (DeepAVFusion drops it, as the official
    code): patch embedding, positions, blocks, norm."""
    x = F.conv2d(x, sd[prefix + 'patch_embed.proj.weight'], sd[prefix + 'patch_embed.proj.bias'], stride=16)
    x = x.flatten(2).transpose(1, 2) + pos
    for i in range(DEPTH):
        x = timm_block(sd, f'{prefix}blocks.{i}.', x)
    return F.layer_norm(x, (D,), sd[prefix + 'norm.weight'], sd[prefix + 'norm.bias'], 1e-6)


# ---------------------------------------------------------------- MAE, models_mae.py and models_vit.py

@pytest.mark.parametrize('layout', ['models_mae', 'models_vit'])
def test_mae_image_vit_gives_the_original_tokens(layout):
    g = torch.Generator().manual_seed(0)
    sd = timm_vit_state(g, '', 3, 1 + 16)
    sd['norm.weight'], sd['norm.bias'] = 1 + 0.2 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)
    if layout == 'models_mae':  # the pre-training model: decoder and mask token beside the encoder
        sd.update({'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.zeros(16, D),
                   'decoder_pos_embed': torch.zeros(1, 17, 16), 'decoder_pred.weight': torch.zeros(768, 16)})
    else:  # models_vit.VisionTransformer: a classification head
        sd.update({'head.weight': torch.zeros(10, D), 'head.bias': torch.zeros(10)})
    enc = DeepAVFusion(config(fusion='none')).eval()
    enc.load_unimodal('image', {'model': sd})
    image = torch.randn(2, 3, 64, 64, generator=g)
    pos = torch.from_numpy(mae_sincos(D, 4, 4)).float()
    assert torch.allclose(enc.image.pos_embed[0], pos, atol=1e-6)  # the recomputed positions are MAE's
    with torch.no_grad():
        ours = enc(image, torch.zeros(2, 1, 128, 192))[0]
        theirs = mae_encoder(sd, image, pos)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


# ---------------------------------------------------------------- AudioMAE: (time, frequency) patches

def test_m2_transposed_kernel_equals_the_original_on_transposed_patches():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (1, 1, 32, 48), generator=g).float()  # integers: every sum is exact, in any order
    w = torch.randint(-3, 4, (8, 1, 16, 16), generator=g).float()
    ours = F.conv2d(x, w.transpose(-1, -2), stride=16)  # (1, 8, 2, 3): frequency x time grid
    theirs = F.conv2d(x.transpose(-1, -2), w, stride=16)  # (1, 8, 3, 2): time x frequency, AudioMAE's
    assert torch.equal(ours, theirs.transpose(-1, -2))


def audiomae_state(seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = timm_vit_state(g, '', 1, 513)  # its 64 x 8 grid of 1024 x 128 and a class token
    sd['norm.weight'], sd['norm.bias'] = 1 + 0.2 * torch.randn(D, generator=g), 0.2 * torch.randn(D, generator=g)
    sd.update({'mask_token': torch.zeros(1, 1, 16), 'decoder_embed.weight': torch.zeros(16, D)})
    return sd, g


def test_audiomae_loads_the_right_way_round():
    sd, g = audiomae_state()
    assert is_audiomae(sd) and not is_audiomae({**sd, 'pos_embed': torch.zeros(1, 97, D)})
    enc = DeepAVFusion(config(fusion='none')).eval()
    enc.load_unimodal('audio', sd)
    spec = torch.randn(2, 1, 128, 192, generator=g)  # this project's (frequency, time)
    # AudioMAE's computation on its own orientation: its kernel on (time, frequency) patches, a 12 x 8 grid
    # (time-major), turned back to this grid's frequency-major order; the positions are recomputed (as for MAE).
    tokens = F.conv2d(spec.transpose(-1, -2), sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16)
    tokens = tokens.transpose(-1, -2).flatten(2).transpose(1, 2) + sincos_pos_embed(D, 8, 12)
    x = tokens
    for i in range(DEPTH):
        x = timm_block(sd, f'blocks.{i}.', x)
    theirs = F.layer_norm(x, (D,), sd['norm.weight'], sd['norm.bias'], 1e-6)
    with torch.no_grad():
        ours = enc(torch.zeros(2, 3, 64, 64), spec)[1]
    assert torch.allclose(ours, theirs, atol=1e-5)
    # as_is (the official code): the kernel unchanged, each kernel sees its patch transposed: other tokens.
    as_is = DeepAVFusion(config(fusion='none')).eval()
    as_is.load_unimodal('audio', sd, layout='as_is')
    assert torch.equal(as_is.audio.patch_embed.proj.weight, sd['patch_embed.proj.weight'])
    assert torch.equal(enc.audio.patch_embed.proj.weight, sd['patch_embed.proj.weight'].transpose(-1, -2))
    with torch.no_grad():
        assert not torch.allclose(as_is(torch.zeros(2, 3, 64, 64), spec)[1], ours, atol=1e-3)


def test_audio_init_layout_flag_reaches_the_loader(tmp_path):
    import pretrain
    import training
    sd, _ = audiomae_state()
    torch.save({'model': sd}, tmp_path / 'audiomae.pth')
    common = ['--image_size', '64', '--embed_dim', str(D), '--depth', str(DEPTH), '--num_heads', str(HEADS),
              '--fusion_num_heads', str(HEADS), '--audio_init', str(tmp_path / 'audiomae.pth')]
    for layout, w in (('auto', sd['patch_embed.proj.weight'].transpose(-1, -2)), ('as_is', sd['patch_embed.proj.weight'])):
        enc = training.make_encoder(pretrain.parse_args(common + ['--audio_init_layout', layout]))
        assert torch.equal(enc.audio.patch_embed.proj.weight, w)


# ---------------------------------------------------------------- CAV-MAE, cav_mae.py

def cavmae_state(g, joint=1):
    """CAV-MAE's CAVMAE state dict (DataParallel's 'module.' prefix): patch_embed_a/_v, modality_a/_v, learnable-
    shaped pos_embed_a/_v, blocks_a/_v/_u (its Block: timm's with norm1_a/_v, norm2_a/_v beside norm1/2), norm_a,
    norm_v, norm, and a decoder."""
    specific = DEPTH - joint
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {'patch_embed_a.proj.weight': r(D, 1, 16, 16), 'patch_embed_a.proj.bias': r(D),
          'patch_embed_v.proj.weight': r(D, 3, 16, 16), 'patch_embed_v.proj.bias': r(D),
          'modality_a': r(1, 1, D), 'modality_v': r(1, 1, D), 'pos_embed_a': r(1, 96, D), 'pos_embed_v': r(1, 16, D),
          'decoder_embed.weight': r(16, D), 'mask_token': r(1, 1, 16)}
    for name, n in (('blocks_a', specific), ('blocks_v', specific), ('blocks_u', joint)):
        for k, v in timm_vit_state(g, f'{name}.', 1, 0, depth=n, cls=False).items():
            if '.blocks.' in k:
                sd[k.replace(f'{name}.blocks.', f'{name}.')] = v
    for b in [f'blocks_a.{i}' for i in range(specific)] + [f'blocks_v.{i}' for i in range(specific)] + [
            f'blocks_u.{i}' for i in range(joint)]:  # its Block has the three pairs everywhere
        for n in ('norm1_a', 'norm1_v', 'norm2_a', 'norm2_v'):
            sd[f'{b}.{n}.weight'], sd[f'{b}.{n}.bias'] = 1 + r(D), r(D)
    for n in ('norm_a', 'norm_v', 'norm'):
        sd[f'{n}.weight'], sd[f'{n}.bias'] = 1 + r(D), r(D)
    return {f'module.{k}': v for k, v in sd.items()}


def cavmae_forward(sd, image, audio):
    """cav_mae.py's forward_encoder at mask ratio 0: a = patch_embed_a(fbank (F, T)) + pos + modality_a, the same
    for v; blocks_a, blocks_v; x = blocks_u(cat(a, v)); c^a = blocks_u(a, 'a'), c^v = blocks_u(v, 'v'); norms
    (LayerNorm eps 1e-5). Positions: this front-end's sin-cos, as the project recomputes them."""
    sd = {k[len('module.'):]: v for k, v in sd.items()}
    a = F.conv2d(audio, sd['patch_embed_a.proj.weight'], sd['patch_embed_a.proj.bias'], stride=16)
    a = a.flatten(2).transpose(1, 2) + sincos_pos_embed(D, 8, 12) + sd['modality_a']
    v = F.conv2d(image, sd['patch_embed_v.proj.weight'], sd['patch_embed_v.proj.bias'], stride=16)
    v = v.flatten(2).transpose(1, 2) + sincos_pos_embed(D, 4, 4) + sd['modality_v']
    blk = lambda x, b, n1='norm1', n2='norm2': timm_block(sd, b, x, n1, n2, eps=1e-5)  # noqa: E731
    for i in range(DEPTH - 1):
        a, v = blk(a, f'blocks_a.{i}.'), blk(v, f'blocks_v.{i}.')
    x = blk(torch.cat([a, v], 1), 'blocks_u.0.')
    ca, cv = blk(a, 'blocks_u.0.', 'norm1_a', 'norm2_a'), blk(v, 'blocks_u.0.', 'norm1_v', 'norm2_v')
    ln = lambda x, n: F.layer_norm(x, (D,), sd[n + '.weight'], sd[n + '.bias'], 1e-5)  # noqa: E731
    return ln(cv, 'norm_v'), ln(ca, 'norm_a'), ln(x, 'norm')


def test_cavmae_gives_the_original_streams():
    g = torch.Generator().manual_seed(3)
    sd = cavmae_state(g)
    enc = CAVMAEEncoder(config(fusion='none'), 1).eval()
    enc.load_checkpoint(sd)
    image, audio = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 1, 128, 192, generator=g)
    with torch.no_grad():
        ours = enc(image, audio)
    for o, t in zip(ours, cavmae_forward(sd, image, audio)):
        assert torch.allclose(o, t, atol=1e-5)


# ---------------------------------------------------------------- python checkpoints.py FILE

def test_checkpoint_report_names_system_layout_and_flags(tmp_path, capsys):
    g = torch.Generator().manual_seed(4)
    sd, _ = audiomae_state()
    torch.save({'model': sd}, tmp_path / 'audiomae.pth')
    r = checkpoints.main([str(tmp_path / 'audiomae.pth')])
    assert r['system'] == 'audio branch' and 'transposed' in r['layout'] and r['error'] is None
    assert set(r['left_out']) == {'cls_token', 'mask_token', 'decoder_embed.weight'}
    assert r['flags'] == f"--audio_init {tmp_path / 'audiomae.pth'}"
    # An official AudioSet-2M-like release: fusion widths 1 and 4, found from the shapes, given as flags.
    enc = DeepAVFusion(config(fusion_attn_ratio=1.0, fusion_mlp_ratio=4.0))
    torch.save({'state_dict': {f'encoder.{k}': v for k, v in enc.state_dict().items()}}, tmp_path / 'as2m.pth')
    r = checkpoints.main([str(tmp_path / 'as2m.pth')])
    assert r['system'] == 'deepavfusion' and r['error'] is None and r['loaded'] == len(enc.state_dict())
    assert '--fusion_attn_ratio 1 --fusion_mlp_ratio 4' in r['flags']
    torch.save(cavmae_state(g), tmp_path / 'cav.pth')
    r = checkpoints.main([str(tmp_path / 'cav.pth')])
    assert r['system'] == 'cavmae' and r['error'] is None and '--system cavmae' in r['flags']
    # A file that does not fit is refused, by name, with the keys named.
    bad = dict(timm_vit_state(g, '', 3, 17), **{'fc_norm.weight': torch.ones(D)})
    torch.save(bad, tmp_path / 'bad.pth')
    r = checkpoints.main([str(tmp_path / 'bad.pth')])
    assert r['error'].startswith(str(tmp_path / 'bad.pth')) and 'missing keys: norm.weight' in r['error']
    assert 'refused' in capsys.readouterr().out
    torch.save({'foo.weight': torch.ones(1)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a layout this project reads'):
        checkpoints.main([str(tmp_path / 'other.pth')])
