"""The systems DeepAVFusion is compared with, in the same code: stream purity (which outputs are uni-modal), the
uni-modal MAE, CAV-MAE's contrastive term (Eq. 7) on worked cases and on DeepAVFusion, and DDP with it."""
import math
import os
import subprocess
import sys

import pytest
import torch

import finetune as ft
import metrics
import pretrain
import training
from cavmae import contrastive_loss
from conftest import ROOT
from helpers import randomize, small_config
from model import DeepAVFusion
from test_pretrain import SMALL, log, run, weights


# ---------------------------------------------------------------- which streams are uni-modal

@pytest.mark.parametrize('layers, pure', [('2', True), ('none', True), ('1-2', False), ('all', False)])
def test_stream_purity_per_fusion_layer_choice(layers, pure):
    """An image output depends on the audio iff two or more layers fuse (Eq. 2-3: the branches read the fusion
    tokens, filled from both modalities from the second fusion layer on; at the first they are the learned
    constants); the uni-modal pass never does."""
    torch.manual_seed(0)
    encoder = randomize(DeepAVFusion(small_config(fusion='factorized' if layers != 'none' else 'none',
                                                  fusion_layers=layers))).eval()  # depth 3
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    other_image, other_audio = image + torch.randn_like(image), audio + torch.randn_like(audio)
    with torch.no_grad():
        x = encoder(image, audio)
        by_audio, by_image = encoder(image, other_audio), encoder(other_image, audio)
        u = encoder(image, audio, unimodal=True)
        u_by_audio, u_by_image = encoder(image, other_audio, unimodal=True), encoder(other_image, audio, unimodal=True)
    assert torch.equal(x[0], by_audio[0]) == pure and torch.equal(x[1], by_image[1]) == pure
    assert torch.equal(u[0], u_by_audio[0]) and torch.equal(u[1], u_by_image[1])  # to the bit
    assert not torch.equal(u[0], u_by_image[0])


# ---------------------------------------------------------------- Eq. 7

def test_contrastive_loss_worked_cases():
    eye = torch.eye(4)
    loss, acc = contrastive_loss(eye, eye)
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-20)), rel=1e-6) and acc == 1  # 6.1835e-09
    assert contrastive_loss(torch.ones(4, 4), torch.ones(4, 4))[0].item() == pytest.approx(math.log(4), rel=1e-6)
    assert contrastive_loss(-eye, eye)[0].item() == pytest.approx(21.0986123, rel=1e-6)  # anti-aligned
    a, v = torch.tensor([[1., 0], [1, 0]]), torch.tensor([[1., 0], [0, 1]])
    assert contrastive_loss(v, a)[0].item() == pytest.approx(math.log(2), rel=1e-6)  # image -> audio, the code's
    assert contrastive_loss(a, v)[0].item() == pytest.approx(10.0, rel=1e-6)  # the other direction
    assert contrastive_loss(v, a, bidirectional=True)[0].item() == pytest.approx(5.3465736, rel=1e-6)
    assert contrastive_loss(v, 3 * a)[0].item() == pytest.approx(math.log(2), rel=1e-6)  # normalised


def test_local_negatives_are_the_mean_of_the_processes_losses():
    """Groups of n clips, shared out as torchrun's processes share a batch (clip i to process i mod world)."""
    torch.manual_seed(0)
    v, a = torch.randn(8, 5), torch.randn(8, 5)
    halves = (contrastive_loss(v[0::2], a[0::2])[0] + contrastive_loss(v[1::2], a[1::2])[0]) / 2
    assert contrastive_loss(v, a, group=4)[0].item() == pytest.approx(halves.item(), rel=1e-6)
    with pytest.raises(ValueError, match='groups of 3 clips'):
        contrastive_loss(v, a, group=3)


# ---------------------------------------------------------------- the uni-modal MAE and the term on DeepAVFusion

def test_unimodal_mae_trains_one_branch_and_its_decoder(tmp_path):
    args = pretrain.parse_args(SMALL + ['--modalities', 'image'])
    assert (args.fusion, args.fusion_layers) == ('none', 'none')
    torch.manual_seed(0)
    mae = pretrain.build_mae(args)
    batch = {'image': torch.randn(2, 3, 32, 32), 'audio': torch.randn(2, 1, 128, 192)}
    out = mae(batch['image'], batch['audio'])
    assert set(out) >= {'loss_image', 'pred_image'} and 'loss_audio' not in out
    loss, terms = pretrain.pretraining_loss(out, args)
    loss.backward()
    learned = {n for n, p in mae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith('encoder.image.blocks') for n in learned)
    assert any(n.startswith('image_decoder_blocks') for n in learned)
    assert not any(n.startswith(('encoder.audio', 'audio_decoder', 'encoder.fusion')) for n in learned)
    with pytest.raises(SystemExit):
        pretrain.parse_args(SMALL + ['--modalities', 'audio', '--fusion', 'factorized', '--fusion_layers', 'all'])


def test_contrastive_term_on_the_unimodal_pass_and_its_refusal(capsys):
    args = pretrain.parse_args(SMALL + ['--contrast_weight', '0.5'])
    torch.manual_seed(0)
    mae = pretrain.build_mae(args)
    image, audio = torch.randn(4, 3, 32, 32), torch.randn(4, 1, 128, 192)
    out = mae(image, audio, unimodal_pass=True)
    loss, terms = pretrain.pretraining_loss(out, args)
    expected = contrastive_loss(out['u_image'].mean(1), out['u_audio'].mean(1))[0]
    assert terms['loss_contrast'].item() == pytest.approx(expected.item())
    assert loss.item() == pytest.approx((out['loss_image'] + out['loss_audio'] + 0.5 * expected).item(), rel=1e-6)
    # The term reaches the branches through the uni-modal pass and no fusion block: only Eq. 16 trains those.
    mae.zero_grad()
    terms['loss_contrast'].backward()
    grads = {n: p.grad for n, p in mae.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith('encoder.image.blocks') for n in grads) and any('audio.blocks' in n for n in grads)
    assert not any(n.startswith(('encoder.fusion', 'image_decoder', 'audio_decoder')) for n in grads)
    with pytest.raises(SystemExit):
        pretrain.parse_args(SMALL + ['--contrast_weight', '0.1', '--contrast_on', 'branch'])
    assert 'would collapse' in capsys.readouterr().err
    one_layer = pretrain.parse_args(SMALL + ['--contrast_weight', '0.1', '--contrast_on', 'branch',
                                             '--fusion_layers', '1'])
    assert one_layer.contrast_on == 'branch'


@pytest.mark.parametrize('system', [['--modalities', 'audio'], ['--contrast_weight', '0.1']])
def test_each_system_resumes_exactly(tmp_path, system):
    full = run(tmp_path, 'full', '--max_steps', '5', '--num_workers', '0', *system)
    part = run(tmp_path, 'part', '--max_steps', '2', '--num_workers', '0', *system)  # stops mid-epoch 0
    pretrain.main(['--resume', str(part), '--max_steps', '5', '--num_workers', '0'])
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r['loss'] for r in log(full)] == [r['loss'] for r in log(part)]
    assert ('loss_contrast' in log(full)[0]) == ('--contrast_weight' in system)


@pytest.mark.parametrize('negatives', ['local', 'gathered'])
def test_ddp_with_the_contrastive_term_equals_one_process(tmp_path, negatives):
    """Two Gloo processes x batch 2: local negatives equal one process x batch 4 whose negatives are the
    processes' halves (--contrast_batch 2); gathered negatives equal the whole batch's loss."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    common = SMALL + ['--max_steps', '2', '--num_workers', '0', '--contrast_weight', '1']
    two = ['--contrast_gather'] if negatives == 'gathered' else []
    one = [] if negatives == 'gathered' else ['--contrast_batch', '2']
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    str(ROOT / 'pretrain.py'), *common, *two, '--batch_size', '2',
                    '--output_dir', str(tmp_path / 'two')],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / 'pretrain.py'), *common, *one, '--batch_size', '4',
                    '--output_dir', str(tmp_path / 'one')], check=True, env=env, cwd=tmp_path, capture_output=True)
    for a, b in zip(log(tmp_path / 'one'), log(tmp_path / 'two')):
        for k in ('loss', 'loss_contrast', 'loss_image'):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)


# ---------------------------------------------------------------- cross-modal retrieval

def test_retrieval_ranks_worked_cases():
    sim = torch.tensor([[.9, .1, .5], [.8, .7, .2], [.3, .6, .4]])  # rows: queries
    assert metrics.cross_modal_retrieval(sim) == pytest.approx({'R@1': 1 / 3, 'R@5': 1, 'R@10': 1, 'MR': 2})
    assert metrics.cross_modal_retrieval(sim.T, 'a2v_') == pytest.approx(
        {'a2v_R@1': 2 / 3, 'a2v_R@5': 1, 'a2v_R@10': 1, 'a2v_MR': 1})
    a = torch.eye(10)  # each query's match ties with eight others at 0 and loses to one at 1: strict rank 1
    r = metrics.cross_modal_retrieval(a.roll(1, 0) @ a.T)
    assert (r['R@1'], r['R@5'], r['MR']) == (0, 1, 2)


def test_retrieval_uses_unimodal_passes_and_samples_per_class(tmp_path, monkeypatch):
    seen = []
    forward = DeepAVFusion.forward
    monkeypatch.setattr(DeepAVFusion, 'forward', lambda self, *a, **k: seen.append(k.get('unimodal')) or
                        forward(self, *a, **k))
    small = ['--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads',
             '2', '--num_workers', '0', '--synthetic_clips', '256', '--batch_size', '16']
    r = ft.main(['--task', 'retrieval', '--retrieval_per_class', '3', '--output_dir', str(tmp_path), *small])
    assert r['clips'] == 3 * 8 and seen and all(seen)  # 8 classes; every pass uni-modal
    assert 0 <= r['v2a_R@1'] <= r['v2a_R@5'] <= r['v2a_R@10'] <= 1 and r['a2v_MR'] >= 1


# ---------------------------------------------------------------- CAV-MAE

def official_cavmae_keys(depth=2, joint=1, decoder_depth=1):
    """The state-dict keys of the official CAVMAE (src/models/cav_mae.py) for these depths."""
    block = [f'{n}.{p}' for n in ('norm1', 'norm1_a', 'norm1_v', 'norm2', 'norm2_a', 'norm2_v', 'attn.qkv',
                                  'attn.proj', 'mlp.fc1', 'mlp.fc2') for p in ('weight', 'bias')]
    keys = ['patch_embed_a.proj.weight', 'patch_embed_a.proj.bias', 'patch_embed_v.proj.weight',
            'patch_embed_v.proj.bias', 'modality_a', 'modality_v', 'pos_embed_a', 'pos_embed_v',
            'norm_a.weight', 'norm_a.bias', 'norm_v.weight', 'norm_v.bias', 'norm.weight', 'norm.bias',
            'decoder_embed.weight', 'decoder_embed.bias', 'mask_token', 'decoder_modality_a', 'decoder_modality_v',
            'decoder_pos_embed_a', 'decoder_pos_embed_v', 'decoder_norm.weight', 'decoder_norm.bias',
            'decoder_pred_a.weight', 'decoder_pred_a.bias', 'decoder_pred_v.weight', 'decoder_pred_v.bias']
    for stack, n in (('blocks_a', depth - joint), ('blocks_v', depth - joint), ('blocks_u', joint),
                     ('decoder_blocks', decoder_depth)):
        keys += [f'{stack}.{i}.{k}' for i in range(n) for k in block]
    return set(keys)


def cavmae_model(**overrides):
    from cavmae import CAVMAE, CAVMAEEncoder
    torch.manual_seed(0)
    encoder = CAVMAEEncoder(small_config(fusion='none', **overrides), joint_layers=1)
    return CAVMAE(encoder, decoder_dim=16, decoder_depth=1, decoder_num_heads=2)


def test_cavmae_names_follow_the_official_code_and_its_checkpoints_load():
    model = cavmae_model(depth=2)
    ours = {k[len('encoder.'):] if k.startswith('encoder.') else k for k in model.state_dict()}
    assert ours == official_cavmae_keys()
    # A checkpoint laid out like theirs: top-level keys under DataParallel's 'module.', 512 audio positions.
    theirs = {('module.' + k[len('encoder.'):] if k.startswith('encoder.') else 'module.' + k): v.clone() + 1
              for k, v in randomize(cavmae_model(depth=2)).state_dict().items()}
    theirs['module.pos_embed_a'] = torch.zeros(1, 512, 64)
    encoder = cavmae_model(depth=2).encoder
    encoder.load_checkpoint({'model': theirs})
    sd = encoder.state_dict()
    assert torch.equal(sd['blocks_u.0.norm1_a.weight'], theirs['module.blocks_u.0.norm1_a.weight'])
    assert torch.equal(sd['pos_embed_a'], cavmae_model(depth=2).encoder.pos_embed_a)  # recomputed, 2 x 3 here


def test_cavmae_streams_and_their_gradients():
    model = randomize(cavmae_model()).eval()  # depth 3: 2 modality-specific layers and the joint one
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    noise = (torch.rand(2, 16), torch.rand(2, 6))  # the same masks for both
    with torch.no_grad():
        a = model(image, audio, *noise)
        b = model(image + torch.randn_like(image), audio, *noise)
    assert torch.equal(a['u_audio'], b['u_audio']) and not torch.equal(a['x_fusion'], b['x_fusion'])
    assert a['u_audio'].shape[1] == int(6 * 0.25) and a['u_image'].shape[1] == int(16 * 0.25)  # visible tokens
    model.train()
    out = model(image, audio)
    loss, _ = contrastive_loss(out['u_image'].mean(1), out['u_audio'].mean(1))
    loss.backward(retain_graph=True)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {'encoder.blocks_u.0.norm1_a.weight', 'encoder.blocks_u.0.norm1_v.weight',
            'encoder.blocks_a.0.attn.qkv.weight', 'encoder.norm_a.weight'} <= grads
    assert not any(n.startswith(('decoder', 'mask_token', 'encoder.norm.')) or n.endswith('.norm1.weight')
                   and 'blocks_u' in n for n in grads)  # the joint stream and the decoder: Eq. 9 only
    model.zero_grad()
    (out['loss_image'] + out['loss_audio']).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {'decoder_pred_a.weight', 'encoder.blocks_u.0.norm1.weight', 'encoder.norm.weight'} <= grads
    assert not any(n.endswith(('norm1_a.weight', 'norm1_v.weight')) and 'blocks_u' in n for n in grads)


def test_cavmae_pretrains_resumes_and_runs_downstream(tmp_path):
    system = ['--system', 'cavmae', '--depth', '3']
    full = run(tmp_path, 'full', '--max_steps', '5', '--num_workers', '0', *system)
    part = run(tmp_path, 'part', '--max_steps', '2', '--num_workers', '0', *system)
    pretrain.main(['--resume', str(part), '--max_steps', '5', '--num_workers', '0'])
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a) and 'encoder.blocks_u.0.norm1_a.weight' in a
    assert 'loss_contrast' in log(full)[0]  # lambda_c 0.01, its default
    small = ['--num_workers', '0', '--synthetic_clips', '32', '--batch_size', '8', '--max_steps', '2']
    for task in ('linprobe', 'segment', 'retrieval'):
        r = ft.main(['--task', task, '--init', str(full), '--output_dir', str(tmp_path / task), *small])
        assert r, task
    assert training.load_checkpoint(tmp_path / 'linprobe')['args']['system'] == 'cavmae'


def test_table3_mae_row_public_checkpoint_on_its_own_modality(tmp_path):
    """Table 3's MAE row as the paper ran it: a public MAE-format ViT for the image branch, no fusion, no further
    pre-training, a linear probe on the image features; the branch is the file's, and with no fusion the
    'fusion' feature is the same for every clip (not a feature)."""
    from test_model import mae_checkpoint
    shape = ['--image_size', '64', '--embed_dim', '64', '--depth', '3', '--num_heads', '4', '--fusion_num_heads', '4']
    src = randomize(DeepAVFusion(small_config()))
    torch.save(mae_checkpoint(src.image), tmp_path / 'mae.pth')
    ft.main(['--task', 'linprobe', '--image_init', str(tmp_path / 'mae.pth'), '--fusion', 'none', '--feats', 'image',
             '--output_dir', str(tmp_path / 'lp'), '--num_workers', '0', '--synthetic_clips', '32', '--batch_size', '8',
             '--max_steps', '2', *shape])
    probe = training.load_checkpoint(tmp_path / 'lp')['model']
    own = {k: v for k, v in src.image.state_dict().items() if k != 'pos_embed'}
    assert all(torch.equal(probe[f'encoder.image.{k}'], v) for k, v in own.items())  # frozen, the file's
    encoder = DeepAVFusion(small_config(fusion='none'))
    fusion = encoder(torch.randn(3, 3, 64, 64), torch.randn(3, 1, 32, 48))[2].mean(1)
    assert torch.equal(fusion[0], fusion[1]) and torch.equal(fusion[1], fusion[2])


def test_layer_decay_of_cavmae_names():
    scale = ft.layer_decay_scale(3, 0.5, joint_layers=1)  # 2 modality-specific layers, then the joint one
    assert scale('encoder.blocks_a.0.attn.qkv.weight') == scale('encoder.blocks_v.0.mlp.fc1.weight') == 0.5 ** 3
    assert scale('encoder.blocks_u.0.norm1_a.weight') == 0.5
    assert scale('encoder.norm_a.weight') == scale('encoder.norm.bias') == scale('head.weight') == 1
    assert scale('encoder.patch_embed_a.proj.weight') == scale('encoder.modality_v') == 0.5 ** 4
