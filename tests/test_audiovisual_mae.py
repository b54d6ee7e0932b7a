"""Audiovisual MAE (audiovisual_mae.py, pretrain.py --system avmae): the worked cases of its specification (the
masked-count rule, the 0.5 / 0.5 weighting, the inpainting layout and its refusal, leakage per encoder, a shared
decoder's size), its gradients, and a short run of every encoder x decoder combination its paper allows."""
import pytest
import torch

import finetune as ft
import pretrain
import training
from audiovisual_mae import AudiovisualMAE, AudiovisualMAEEncoder
from helpers import randomize, small_config
from mae import mae_loss, patchify, random_masking
from test_pretrain import SMALL, log, run, weights


def model(encoder='mid', decoder='shared', objective='joint', image_ratio=0.9, audio_ratio=0.5, **shape):
    """An Audiovisual MAE of depth 4 (mid-fusion: 2 separate layers, 2 joint), D = 64, decoder 32 x 1."""
    config = small_config(fusion='none', fusion_layers='none', depth=4, **shape)
    return AudiovisualMAE(AudiovisualMAEEncoder(config, encoder, 2), 32, 1, 4, image_ratio, audio_ratio,
                          decoder=decoder, objective=objective)


def test_masked_count_rule_keeps_the_floor_of_the_visible_share():
    """This project keeps int(n (1 - p)) patches (MAE's rule), where the official code masks int(p n): at
    n = 196, p = 0.9 it keeps 19 where the code keeps 20; the other cases agree."""
    for n, p, kept in ((196, 0.9, 19), (96, 0.8, 19), (96, 0.5, 48), (196, 0.75, 49)):
        ids_keep, mask, _ = random_masking(torch.rand(2, n), p)
        assert ids_keep.shape[1] == kept and mask.sum(1).tolist() == [n - kept] * 2


def test_modalities_weighted_half_and_half():
    """With L_a = 2 and L_v = 4 its loss is 0.5 x 2 + 0.5 x 4 = 3.0; DeepAVFusion's Eq. 16 gives 6.0."""
    out = {'loss_image': torch.tensor(4.0), 'loss_audio': torch.tensor(2.0)}
    assert pretrain.pretraining_loss(out, pretrain.parse_args(['--system', 'avmae']))[0].item() == 3.0
    assert pretrain.pretraining_loss(out, pretrain.parse_args([]))[0].item() == 6.0
    args = pretrain.parse_args(['--system', 'avmae', '--preset', 'base'])  # its configs' recipe at ViT-B
    assert (args.decoder_dim, args.decoder_depth, args.decoder_num_heads, args.image_mask_ratio,
            args.audio_mask_ratio, args.norm_pix_loss, args.warmup_epochs, args.blr) == (384, 4, 6, 0.9, 0.5, False,
                                                                                          4, 1.5e-4)


def test_inpainting_layout_and_refusal():
    """The image (196 patches) from the audio at 0.8 (19 visible): 19 projected audio tokens, then 177 image mask
    tokens; only the last 177 slots are scored, so a prediction right there and garbage before scores 0."""
    m = randomize(model(objective='inpaint_image', image_ratio=0.75, audio_ratio=0.8, image_size=224,
                        audio_size=(128, 192))).eval()
    image, audio = torch.randn(2, 3, 224, 224), torch.randn(2, 1, 128, 192)
    masking = {k: random_masking(torch.rand(2, n), r) for k, n, r in (('image', 196, 0.75), ('audio', 96, 0.8))}
    tokens = {'image': torch.randn(2, 49, 64), 'audio': torch.randn(2, 19, 64)}
    x, scored = m.decoder_input('image', tokens, masking['image'][2])
    pos = m.decoder_pos_image
    assert x.shape == (2, 196, 32) and scored.tolist() == [[0.0] * 19 + [1.0] * 177] * 2
    assert torch.allclose(x[:, :19], m.decoder_projection['audio'](tokens['audio']) + pos[:, :19])
    assert torch.allclose(x[:, 19:], (m.mask_token['image'] + pos[:, 19:]).expand(2, -1, -1))
    with torch.no_grad():
        out = m(image, audio)
    assert set(k for k in out if k.startswith('loss')) == {'loss_image'}  # the audio is not a target
    target = patchify(image, 16)
    garbage = torch.cat([torch.randn(2, 19, target.shape[-1]), target[:, 19:]], dim=1)
    assert mae_loss(target, garbage, out['mask_image'], norm_pix_loss=False) == 0
    with pytest.raises(ValueError, match=r'audio \(96 patches\) cannot be inpainted from the 98 visible image'):
        model(objective='inpaint_audio', image_ratio=0.5, image_size=224, audio_size=(128, 192))


@pytest.mark.parametrize('encoder, leaks', [('separate', False), ('shared', False), ('early', True), ('mid', True)])
def test_leakage_per_encoder(encoder, leaks):
    """Separate and shared: the image output does not change when the audio does, to the bit; early and mid-fusion:
    it does, and mid-fusion's first L - S = 2 layers do not."""
    enc = randomize(AudiovisualMAEEncoder(small_config(fusion='none', fusion_layers='none', depth=4), encoder)).eval()
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        a, b = enc(image, audio, return_layers=True), enc(image, audio + torch.randn_like(audio), return_layers=True)
    assert torch.equal(a[0], b[0]) != leaks
    assert not torch.equal(a[1], b[1])
    assert len(a[3]) == 4
    if encoder == 'mid':
        assert all(torch.equal(a[3][i][0], b[3][i][0]) for i in range(2)) and not torch.equal(a[3][2][0], b[3][2][0])
        assert torch.equal(enc(image, audio, unimodal=True)[0], enc(image, audio * 2, unimodal=True)[0])
    if encoder == 'shared':
        assert enc.image.blocks is enc.audio.blocks
    if encoder == 'early':
        with pytest.raises(ValueError, match='no uni-modal stream'):
            enc(image, audio, unimodal=True)


def test_shared_decoder_is_one_decoder_and_separate_with_separate_is_refused():
    size = {d: sum(p.numel() for p in model(decoder=d).decoders.parameters()) for d in ('shared', 'separate', 'joint')}
    one = sum(p.numel() for p in model().decoders['image'].parameters())
    assert size['shared'] == size['joint'] == one and size['separate'] == 2 * one
    with pytest.raises(ValueError, match='two uncoupled MAEs'):
        model(encoder='separate', decoder='separate')


def test_gradients_reach_what_each_objective_trains():
    """Joint reconstruction trains everything; inpainting the image from the audio leaves the audio's mask token
    and output head, and the image's decoder projection, untouched (they are not on its path)."""
    def learning(objective):
        m = randomize(model(objective=objective))
        out = m(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48))
        sum(v for k, v in out.items() if k.startswith('loss')).backward()
        return {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learning('joint') == {n for n, _ in model().named_parameters()}
    idle = {'mask_token.audio', 'output_projection.audio.weight', 'output_projection.audio.bias',
            'decoder_projection.image.weight', 'decoder_projection.image.bias'}
    inpaint = learning('inpaint_image')
    assert not inpaint & idle and {'encoder.image.blocks.0.mlp.fc1.weight', 'mask_token.image'} <= inpaint


COMBINATIONS = [  # every encoder x decoder its paper allows, the objectives spread over them
    ('early', 'shared', 'joint'), ('early', 'separate', 'inpaint_image'), ('early', 'joint', 'inpaint_both'),
    ('separate', 'shared', 'joint'), ('separate', 'joint', 'joint'), ('shared', 'shared', 'inpaint_audio'),
    ('shared', 'separate', 'joint'), ('shared', 'joint', 'joint'), ('mid', 'shared', 'joint'),
    ('mid', 'separate', 'inpaint_both'), ('mid', 'joint', 'inpaint_image')]


@pytest.mark.parametrize('encoder, decoder, objective', COMBINATIONS)
def test_each_combination_pretrains_and_resumes_exactly(tmp_path, encoder, decoder, objective):
    flags = ['--system', 'avmae', '--image_size', '64', '--depth', '3', '--num_workers', '0', '--avmae_encoder',
             encoder, '--avmae_decoder', decoder, '--avmae_objective', objective, '--audio_mask_ratio', '0.9']
    full = run(tmp_path, 'full', '--max_steps', '2', *flags)
    part = run(tmp_path, 'part', '--max_steps', '1', *flags)
    pretrain.main(['--resume', str(part), '--max_steps', '2', '--num_workers', '0'])
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a) and [r['loss'] for r in log(full)] == [r['loss'] for r in log(part)]


def test_its_checkpoints_run_downstream_and_retrieval_says_where_it_cannot(tmp_path):
    small = ['--num_workers', '0', '--synthetic_clips', '32', '--batch_size', '8', '--max_steps', '2']
    for encoder in ('mid', 'early'):
        out = run(tmp_path, encoder, '--system', 'avmae', '--image_size', '64', '--depth', '3', '--max_steps', '1',
                  '--num_workers', '0', '--avmae_encoder', encoder)
        assert ft.main(['--task', 'linprobe', '--init', str(out), '--output_dir', str(tmp_path / f'lp_{encoder}'),
                        *small])['top1'] >= 0
        probe = training.load_checkpoint(tmp_path / f'lp_{encoder}')['args']
        assert (probe['system'], probe['avmae_encoder']) == ('avmae', encoder)
    assert 'v2a_R@1' in ft.main(['--task', 'retrieval', '--init', str(tmp_path / 'mid'), '--output_dir',
                                 str(tmp_path / 'r_mid'), *small])
    with pytest.raises(ValueError, match='no uni-modal stream'):
        ft.main(['--task', 'retrieval', '--init', str(tmp_path / 'early'), '--output_dir', str(tmp_path / 'r_e'),
                 *small])
    scale = ft.layer_decay_scale(3, 0.5, joint_layers=2)  # mid-fusion: 1 separate layer, then 2 joint ones
    assert scale('encoder.image.blocks.0.attn.qkv.weight') == 0.5 ** 3
    assert scale('encoder.blocks.1.mlp.fc1.weight') == 0.5
