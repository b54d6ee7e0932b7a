"""LAVISH (lavish.py, finetune.py --adapter lavish): the worked cases L1-L4 of the specification (identity at
initialisation, zero latents, parameter counts, a frozen backbone) and runs of each task it serves."""
import json

import pytest
import torch

import finetune as ft
import training
from helpers import randomize, small_config
from lavish import LAVISH, Adapter
from model import DeepAVFusion, sincos_pos_embed

SMALL = ['--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads', '2',
         '--synthetic_clips', '16', '--batch_size', '8', '--epochs', '1', '--num_workers', '0', '--preset', 'tiny']


def inputs(c, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, *c.image_hw, generator=g), torch.randn(batch, 1, *c.audio_size, generator=g))


def frozen_reference(encoder, image, audio, shared):
    """The plain frozen encoder LAVISH adapts: the branches without fusion tokens, or (shared) the image ViT on
    both modalities, the spectrogram repeated to 3 channels, with the audio grid's sin-cos positions."""
    if not shared:
        return encoder(image, audio, unimodal=True)[:2]
    vit = encoder.image
    x_audio = vit.patch_embed(audio.expand(-1, 3, -1, -1)) + sincos_pos_embed(vit.pos_embed.shape[-1],
                                                                              *encoder.audio.grid)
    x_image = vit.embed(image)
    for blk in vit.blocks:
        x_image, x_audio = blk(x_image), blk(x_audio)
    return vit.norm(x_image), vit.norm(x_audio)


@pytest.mark.parametrize('backbone', ['shared', 'separate'])
@pytest.mark.parametrize('variant', ['ave', 'avs'])
def test_l1_identity_at_initialisation(backbone, variant):
    c = small_config()
    encoder = randomize(DeepAVFusion(c)).eval()  # with fusion blocks, which LAVISH does not use
    image, audio = inputs(c)
    lav = LAVISH(encoder, backbone, tokens=4, reduction=4, groups=2, variant=variant)
    for m in (lav.train(), lav.eval()):  # BatchNorm in both modes: the zero gates hide it exactly
        out = m(image, audio)
        ref = frozen_reference(encoder, image, audio, backbone == 'shared')
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # Once the gates open, each stream depends on the other modality: LAVISH is not uni-modal.
    with torch.no_grad():
        for p in lav.adapters.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    lav.eval()
    a = lav(image, audio)[0]
    b = lav(image, audio + 1.0)[0]
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match='no uni-modal pass'):
        lav(image, audio, unimodal=True)


def test_l2_zero_latents_read_the_mean_of_the_other_modality():
    D, N, M = 8, 5, 7
    ad = Adapter(D, tokens=3, reduction=2, groups=2, variant='avs')
    assert torch.equal(ad.latents, torch.zeros_like(ad.latents))
    with torch.no_grad():
        ad.gate_av.fill_(1.0)
    seen = {}
    ad.down.register_forward_pre_hook(lambda m, inp: seen.update(x=inp[0]))
    x, y = torch.randn(2, N, D), torch.randn(2, M, D)
    ad(x, y)
    # The zero latents' scores are all equal: each latent becomes mean_j y_j, and so does every token's read.
    expected = x + y.mean(1, keepdim=True)
    assert torch.allclose(seen['x'][..., 0].transpose(1, 2), expected, atol=1e-6)


def test_l3_parameter_counts():
    for reduction, convs, fc in ((8, 73_728, 147_456), (4, 147_456, 294_912)):
        ad = Adapter(768, tokens=2, reduction=reduction, groups=2)
        assert ad.down.weight.numel() + ad.up.weight.numel() == convs == fc // 2
    with pytest.raises(ValueError, match='divisible by groups=5'):
        Adapter(768, tokens=2, reduction=8, groups=5)


def official_init(tmp_path):
    """An encoder-only checkpoint of SMALL's shape, as --init takes an official one, and its state."""
    encoder = randomize(DeepAVFusion(training.encoder_config(ft.parse_args(['--task', 'finetune'] + SMALL))))
    torch.save(encoder.state_dict(), tmp_path / 'init.pth')
    return str(tmp_path / 'init.pth'), encoder.state_dict()


@pytest.mark.parametrize('task', ['finetune', 'localize', 'segment'])
def test_l4_a_step_changes_adapters_and_head_and_no_backbone_tensor(tmp_path, task):
    init, before = official_init(tmp_path)
    out = tmp_path / task
    m = ft.main(['--task', task, '--adapter', 'lavish', '--init', init, '--output_dir', str(out),
                 '--weight_decay', '0'] + SMALL + ['--synthetic_clips', '24'])
    assert json.loads((out / 'metrics.json').read_text()) == m
    state = training.load_checkpoint(out)['model']
    backbone = {k[len('encoder.backbone.'):]: v for k, v in state.items() if k.startswith('encoder.backbone.')}
    assert backbone.keys() == before.keys()
    assert all(torch.equal(backbone[k], before[k]) for k in before)  # bitwise, LayerNorms included
    torch.manual_seed(0)  # the run's seed: the same adapter initialisation as the run's
    fresh = ft.build_encoder(ft.parse_args(['--task', task, '--adapter', 'lavish', '--init', init] + SMALL))
    start = {f'encoder.{k}': v for k, v in fresh.state_dict().items()}
    adapters = [k for k in state if '.adapters.' in k and 'running' not in k and 'num_batches' not in k]
    assert adapters and all(k in start for k in adapters)
    # Three steps: the first opens the output gates (the only tensors with a gradient while they are 0), the
    # second the stream's read of the latents, the third reaches the latents: every adapter tensor has moved.
    assert [k for k in adapters if torch.equal(state[k], start[k])] == []


def test_trainable_parameters_are_the_adapters_and_the_head():
    args = ft.parse_args(['--task', 'finetune', '--adapter', 'lavish'] + SMALL)
    assert (args.lavish_tokens, args.lavish_reduction, args.lavish_groups) == (2, 8, 2)  # classification
    seg = ft.parse_args(['--task', 'segment', '--adapter', 'lavish'] + SMALL)
    assert (seg.lavish_tokens, seg.lavish_reduction, seg.lavish_groups) == (16, 4, 2)  # dense tasks
    from heads import Classifier
    model = Classifier(ft.build_encoder(args), ['image', 'audio'], 5, frozen=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all('.adapters.' in n or not n.startswith('encoder.') for n in trainable)
    assert model.train().encoder.backbone.training is False


@pytest.mark.parametrize('argv,match', [(['--task', 'linprobe'], 'use it with --task finetune'),
                                        (['--task', 'finetune', '--feats', 'image+fusion'], 'without fusion')])
def test_lavish_refuses_what_it_cannot_do(argv, match, capsys):
    with pytest.raises(SystemExit):
        ft.parse_args(argv + ['--adapter', 'lavish'] + SMALL)
    assert match in capsys.readouterr().err


def test_lavish_adapts_deepavfusion_only():
    from cavmae import CAVMAEEncoder
    with pytest.raises(ValueError, match='not a CAVMAEEncoder'):
        LAVISH(CAVMAEEncoder(small_config(fusion='none'), 1))


def test_lavish_hears_a_shorter_audio_window():
    """finetune's --audio_seconds through LAVISH's shared backbone: the spectrogram's first columns, checked."""
    lavish = LAVISH(randomize(DeepAVFusion(small_config()))).eval()
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        x_image, x_audio, _ = lavish(image, audio[..., :16])
    assert x_audio.shape == (2, 2, 64) and torch.isfinite(x_audio).all()
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 24\) \(or be narrower by whole 16-frame patches\)"):
        lavish(image, audio[..., :24])
