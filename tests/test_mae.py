"""The audio-visual MAE: parity with the official model, masking, the loss, patch helpers, gradients."""
import pytest
import torch

from helpers import fixture_config, key_bias_mask, load_fixture, randomize, small_config
from mae import AVMAE, mae_loss, patchify, random_masking, unpatchify
from plots import paste_prediction
from checkpoints import read_state_dict
from model import DeepAVFusion


def fixture_mae(d):
    c = d['config']
    mae = AVMAE(DeepAVFusion(fixture_config(d)), c['decoder_dim'], c['decoder_depth'], c['decoder_num_heads'],
                c['image_mask_ratio'], c['audio_mask_ratio'], c['norm_pix_loss'])
    mae.load_state_dict(read_state_dict(d['state_dict']), strict=True)
    return mae.eval()


def test_parity_with_official_fixture():
    d = load_fixture()
    mae = fixture_mae(d)
    with torch.no_grad():
        out = mae(d['image'], d['audio'], d['image_noise'], d['audio_noise'])
    assert abs(out['loss_image'] - d['loss_image']) <= 1e-5 and abs(out['loss_audio'] - d['loss_audio']) <= 1e-5
    for k in ('pred_image', 'pred_audio'):
        assert out[k].shape == d[k].shape and (out[k] - d[k]).abs().max() <= 1e-5
    # what a new loss term may read: the encoder's tokens of the visible patches and the masks, as Eq. 15 has them
    encoded = mae.encoder(d['image'], d['audio'], d['image_ids_keep'], d['audio_ids_keep'])
    for ours, official in zip((out['x_image'], out['x_audio'], out['x_fusion']), d['encoder_out_masked']):
        assert (ours - official).abs().max() <= 1e-5
    for ours, enc in zip((out['x_image'], out['x_audio'], out['x_fusion']), encoded):
        torch.testing.assert_close(ours, enc)
    assert torch.equal(out['mask_image'], random_masking(d['image_noise'], 0.75)[1])
    assert torch.equal(out['mask_audio'], random_masking(d['audio_noise'], 0.8)[1])


def test_masking_keeps_lowest_noise_as_official():
    d = load_fixture()
    ids_keep, mask, ids_restore = random_masking(d['image_noise'], 0.75)
    assert torch.equal(ids_keep, d['image_ids_keep'])
    assert torch.equal(random_masking(d['audio_noise'], 0.8)[0], d['audio_ids_keep'])
    assert (mask.sum(1) == 12).all()  # 16 patches, int(16 * 0.25) = 4 visible
    assert (mask.gather(1, ids_keep) == 0).all()
    assert torch.equal(ids_restore.argsort(1)[:, :4], ids_keep)


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 3, 32, 48)
    patches = patchify(x, 16)
    assert patches.shape == (2, 6, 768)
    assert torch.equal(unpatchify(patches, (2, 3), 16, 3), x)
    # patch 4 = row 1, column 1; within a patch, pixels in (row, column, channel) order
    assert torch.equal(patches[0, 4, :3], x[0, :, 16, 16])
    assert torch.equal(patches[0, 4, 3:6], x[0, :, 16, 17])


def test_loss_counts_hidden_patches_only():
    target, pred = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float32)
    changed = pred.clone()
    changed[mask == 0] += 100  # visible patches do not count
    assert mae_loss(target, pred, mask, False) == mae_loss(target, changed, mask, False)
    hand = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(mae_loss(target, pred, mask, False), hand)
    # normalised targets: a perfect prediction of the normalised patch gives zero loss
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert mae_loss(target, norm, mask, True) < 1e-10


def test_paste_perfect_prediction_gives_the_input():
    x = torch.randn(2, 1, 32, 48)
    mask = random_masking(torch.rand(2, 6), 0.5)[1]
    target = patchify(x, 16)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(paste_prediction(x, norm, mask, 16, True), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(paste_prediction(x, target, mask, 16, False), x)


@pytest.mark.parametrize('fusion', ['factorized', 'dense', 'token'])
def test_every_learnable_parameter_gets_a_gradient(fusion):
    torch.manual_seed(0)
    # Half of the 6 audio patches stay visible: with a single visible audio token (ratio 0.8 keeps int(1.2) = 1)
    # the audio-side keys of the dense block have a true gradient of exactly zero (a softmax over one key).
    mae = randomize(AVMAE(DeepAVFusion(small_config(fusion=fusion)), 32, 2, 4, audio_mask_ratio=0.5))
    out = mae(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48))
    (out['loss_image'] + out['loss_audio']).backward()
    largest = max(p.grad.abs().max() for p in mae.parameters())
    for name, p in mae.named_parameters():
        assert p.grad is not None, name
        key_bias = key_bias_mask(name, p)
        learns = ~key_bias if key_bias is not None else torch.ones_like(p, dtype=torch.bool)
        assert (p.grad[learns] != 0).all(), name
    # The encoder's positions are fixed sin-cos; the decoders' learn (the official parameters' requires_grad).
    assert {n for n, _ in mae.named_parameters() if 'pos_embed' in n} == {'image_decoder_pos_embed',
                                                                            'audio_decoder_pos_embed'}
    assert largest > 0
