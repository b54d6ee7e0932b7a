"""Downstream tasks: every metric on cases with known answers; every task end to end on the synthetic data;
--init from this project's and the official checkpoints; clear errors for missing manifest columns."""
import json

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image

import finetune as ft
import heads
import metrics
import pretrain
import training
from helpers import small_config
from model import DeepAVFusion

SMALL = ['--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads', '2',
         '--synthetic_clips', '16', '--batch_size', '8', '--epochs', '1', '--num_workers', '0', '--preset', 'tiny']


# ---------------------------------------------------------------- classification metrics

def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert metrics.topk_accuracy(logits, torch.tensor([1, 0, 2]), (1,)) == {1: 1.0}
    acc = metrics.topk_accuracy(logits, torch.tensor([0, 0, 1]), (1, 2, 5))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(1.0) and acc[5] == 1.0


def test_average_precision_known_answers():
    assert metrics.average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert metrics.average_precision([0.9, 0.8, 0.7], [0, 1, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert metrics.average_precision([0.1, 0.2, 0.3, 0.4], [1, 0, 0, 0]) == pytest.approx(1 / 4)


def test_roc_auc_known_answers():
    assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert metrics.roc_auc([0.5] * 4, [1, 0, 1, 0]) == 0.5  # ties count one half
    assert metrics.roc_auc([0.9, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(3 / 4)  # 3 of 4 pairs ordered right


def test_multilabel_metrics_perfect_and_chance():
    rng = np.random.default_rng(0)
    targets = (rng.random((4000, 5)) < 0.3).astype(float)
    perfect = metrics.multilabel_metrics(targets + 0.01 * rng.random(targets.shape), targets)
    assert perfect == {'mAP': pytest.approx(1.0), 'AUC': pytest.approx(1.0)}
    chance = metrics.multilabel_metrics(rng.random(targets.shape), targets)
    assert abs(chance['AUC'] - 0.5) < 0.03 and abs(chance['mAP'] - 0.3) < 0.03  # AP of chance = prevalence


def test_knn_predict():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    pred = metrics.knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.02, 1.0]]), k=2, temperature=0.07,
                          num_classes=2)
    assert pred.tolist() == [0, 1]


def test_recall_at_k():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.1], [0.9, 0.0]])
    # query 0 (class 0): nearest is bank 0 -> hit at 1; query 1 (class 1): order 0, 2, 1 -> hit first at rank 2
    r = metrics.recall_at_k(bank, labels, queries, torch.tensor([0, 1]), ks=(1, 2, 4))
    assert r == {'R@1': 0.5, 'R@2': 1.0, 'R@4': 1.0}


# ---------------------------------------------------------------- localization and segmentation metrics

def test_localization_metrics():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True
    perfect = metrics.localization_metrics(gt, gt)
    assert perfect['cIoU'] == 1.0 and perfect['AUC'] == pytest.approx(1.0)
    empty = metrics.localization_metrics(torch.zeros_like(gt), gt)
    assert empty['cIoU'] == 0.0 and empty['AUC'] == pytest.approx(0.5 * 0.05)  # success only at threshold 0
    half = torch.zeros_like(gt)
    half[:, 2:6, 4:8] = True  # 8 of 16 truth pixels, union 24: IoU 1/3
    m = metrics.localization_metrics(half, gt)
    assert m['IoU'] == pytest.approx(1 / 3) and m['cIoU'] == 0.0
    assert metrics.localization_metrics(half, gt, iou_threshold=0.3)['cIoU'] == 1.0


def test_pointing_game():
    gt = torch.zeros(4, 8, 8)
    gt[:, :4, :4] = 1  # the top-left quarter
    maps = torch.full((4, 8, 8), 0.1)
    maps[0, 1, 1] = 0.3  # peak inside: a hit, though no value reaches a region at 0.5
    maps[1, 6, 6] = 0.3  # peak outside
    maps[2, 3, 3], maps[2, 3, 4] = 0.29, 0.3  # the edge: the larger value is outside
    maps[3, 0, 7], maps[3, 0, 0] = 0.3, 0.2  # outside, with a smaller bump inside
    assert metrics.pointing_game(maps, gt) == 0.25


def test_binary_segmentation_metrics_both_conventions():
    gt = torch.zeros(3, 6, 6)
    gt[0, :3] = 1
    gt[1, :, :2] = 1  # image 2: no object
    perfect = metrics.binary_segmentation_metrics(gt.clone(), gt)
    assert perfect == {'mIoU': pytest.approx(1.0), 'mIoU_fg': pytest.approx(1.0), 'F': pytest.approx(1.0, abs=1e-6),
                       'F_fg': pytest.approx(1.0, abs=1e-6)}
    pred = gt.clone()
    pred[0] = 0.0
    pred[0, :, :3] = 0.9  # 9 of 18 truth pixels found, 9 false: IoU 9 / 27, precision = recall = 1/2
    m = metrics.binary_segmentation_metrics(pred, gt)
    # Official: image 0's background IoU is also 9 / 27 (rows 3-5 vs columns 3-5), image 1 is perfect, and image
    # 2 (no object) is skipped. AVSBench: foreground IoU only, image 2 (empty, predicted empty) counts 1.
    assert m['mIoU'] == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)
    assert m['mIoU_fg'] == pytest.approx((1 / 3 + 1 + 1) / 3, abs=1e-6)
    # Official F: each image's best threshold. Image 0's is 0, where every pixel counts as predicted:
    # precision 1/2, recall 1, F = 1.3 * 0.5 / (0.3 * 0.5 + 1) = 0.5652 (above the 1/2 of thresholds in (0, 0.9]).
    assert m['F'] == pytest.approx((0.65 / 1.15 + 1) / 2, abs=1e-4)
    # AVSBench F: one threshold for the whole set; in (0, 0.9] image 0 has F = 1/2 and image 1 F = 1, while at 0
    # image 1 drops to 1.3 * (1/3) / 1.1; the set's best is 0.75.
    assert m['F_fg'] == pytest.approx((0.5 + 1) / 2, abs=1e-3)


def test_localization_consensus_maps_and_top_half():
    gt = torch.zeros(1, 4, 4)
    gt[0, :2, :2] = 1.0  # both annotators' boxes
    gt[0, :2, 2:] = 0.5  # one of two
    region = torch.zeros(1, 4, 4)
    region[0, :2, :3] = 1
    # sum(region * gt) = 4 * 1 + 2 * 0.5 = 5; sum(gt) = 6; region where gt == 0: none -> 5 / 6
    assert metrics.consensus_iou(region, gt).item() == pytest.approx(5 / 6)
    region[0, 3, 3] = 1  # one pixel outside every box: 5 / 7
    assert metrics.consensus_iou(region, gt).item() == pytest.approx(5 / 7)
    m = metrics.localization_metrics(region, gt)
    assert m['cIoU'] == 1.0 and m['IoU'] == pytest.approx(5 / 7)
    maps = torch.arange(16.0).reshape(1, 4, 4)  # the top half: the 8 largest values, rows 2-3
    assert metrics.top_half(maps)[0].nonzero()[:, 0].unique().tolist() == [2, 3]
    assert metrics.top_half(maps).sum() == 8


def test_semantic_segmentation_metrics_both_conventions():
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    perfect = metrics.semantic_segmentation_metrics(gt, gt, 4)
    assert all(v == pytest.approx(1.0) for v in perfect.values()) and len(perfect) == 4
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 1, 2], [2, 2, 0, 0], [0, 0, 0, 1]])  # a class-1 pixel called 2; a false 1
    m = metrics.semantic_segmentation_metrics(pred, gt, 4)
    # Official: frame 3 (background only) skipped; per class over the frames where it is seen: background 1;
    # class 1 only in frame 1, IoU 1/2; class 2 IoU 0 in frame 1 (predicted only) and 1 in frame 2; class 3 unseen.
    assert m['mIoU'] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    # F (beta^2 0.3): class 1 in frame 1 has precision 1, recall 1/2: 1.3 * 0.5 / 0.8 = 0.8125.
    assert m['F'] == pytest.approx((1 + 0.8125 + (0 + 1) / 2) / 3, abs=1e-6)
    # Pooled over all pixels of all frames: background 7/8, class 1 1/3, class 2 2/3.
    assert m['mIoU_pooled'] == pytest.approx((7 / 8 + 1 / 3 + 2 / 3) / 3)


# ---------------------------------------------------------------- separation

def test_separation_metrics_known_answers():
    rng = np.random.default_rng(0)
    t, o = rng.standard_normal((2, 16000))
    near = metrics.separation_metrics([t, o], [t + 1e-4 * rng.standard_normal(16000), o])
    assert near['SDR'][0] > 70 and near['SIR'][0] > 70
    leak = metrics.separation_metrics([t, o], [t + 0.1 * o, o + 0.1 * t])  # interference 20 dB down
    assert leak['SIR'][0] == pytest.approx(20, abs=0.5) and leak['SDR'][0] == pytest.approx(20, abs=0.5)
    assert leak['SAR'][0] > 60
    noisy = metrics.separation_metrics([t, o], [t + 0.1 * rng.standard_normal(16000), o])  # artefacts 20 dB down
    assert noisy['SAR'][0] == pytest.approx(20, abs=0.5)
    # BSS-eval's 512-tap filters let 512 / 16000 of the noise count as interference: 10 log10(16000 / 512 / 0.01)
    assert noisy['SIR'][0] == pytest.approx(10 * np.log10(16000 / 512 / 0.01), abs=1.0)
    # The unseparated mixture of two sources of equal power (SDR_mixture): 0 dB, the floor SDRi is measured from.
    mixed = metrics.separation_metrics([t, o], [t + o, t + o])
    assert mixed['SDR'] == pytest.approx([0, 0], abs=0.3)


def test_ideal_mask_separates():
    mix = heads.MixAndSeparate(torch.device('cpu'))
    assert torch.allclose(mix.mel_to_linear.sum(1), torch.ones(401))
    t = torch.arange(48000) / 16000
    a, b = 0.3 * torch.sin(2 * np.pi * 300 * t), 0.3 * torch.sin(2 * np.pi * 3000 * t)
    _, mask, _ = mix.inputs(a[None], b[None])
    ideal = mix.separate((mask * 2 - 1) * 20, (a + b)[None])[0]  # logits +-20: the ideal binary mask
    s = metrics.separation_metrics([a.numpy(), b.numpy()], [ideal.numpy(), b.numpy()])
    assert s['SDR'][0] > 15
    all_pass = mix.separate(torch.full_like(mask, 20.0), (a + b)[None])[0]
    assert torch.allclose(all_pass, a + b, atol=1e-4)  # mask 1 gives the mixture back


@pytest.mark.parametrize('condition', ['concat', 'channels'])
def test_separator_conditions_learn_and_channels_weights_the_unets_output(condition):
    torch.manual_seed(0)
    sep = heads.Separator(DeepAVFusion(small_config()), condition)
    image, audio = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 32, 48)
    out = sep(image, audio)
    assert out.shape == (2, 32, 48)  # a mask logit per spectrogram bin
    out.square().sum().backward()
    quiet = [n for n, p in sep.named_parameters() if not n.startswith('encoder.') and (p.grad is None or
                                                                                      p.grad.abs().sum() == 0)]
    assert quiet == []  # every head parameter learns (no unused one for DDP to trip on)
    if condition == 'channels':  # Sound of Pixels: the picture acts by weighting the U-Net's last channels
        with torch.no_grad():
            sep.cond[0].weight.zero_(), sep.cond[0].bias.zero_(), sep.bias.fill_(0.7)
            assert torch.equal(sep(image, audio), torch.full_like(out, 0.7))
    else:
        assert sep.bias is None and len(sep.cond) == 5  # the official layout: the feature at each of 5 stages


# ---------------------------------------------------------------- tasks end to end

EXPECTED = {'linprobe': {'top1', 'top5'}, 'finetune': {'top1', 'top5'}, 'knn': {'knn_image', 'knn_audio',
            'knn_fusion', 'R@1', 'R@5', 'R@10'}, 'extract': {'clips', 'dim'}, 'localize': {'cIoU', 'AUC'}, 'segment': {'mIoU', 'F'},
            'separate': {'SDR', 'SIR', 'SAR', 'SDR_mixture', 'SDRi'},
            'retrieval': {'v2a_R@1', 'v2a_R@10', 'a2v_R@1', 'a2v_MR'}}
FILES = {'localize': 'localization.png', 'segment': 'segmentation.png', 'separate': 'separated/00_estimate1.wav',
         'extract': 'features_fusion.npy', 'linprobe': 'checkpoint.pt'}


@pytest.mark.parametrize('task', list(ft.TASKS))
def test_task_runs_end_to_end_on_synthetic_data(tmp_path, task):
    result = ft.main(['--task', task, '--output_dir', str(tmp_path), '--max_steps', '2'] + SMALL)
    written = json.loads((tmp_path / 'metrics.json').read_text())
    assert written == result and set(written) >= EXPECTED[task] | {'task', 'init'}
    for k in EXPECTED[task] - {'clips', 'dim'}:
        assert np.isfinite(written[k]), k
    if task in FILES:
        assert (tmp_path / FILES[task]).exists()
    if task == 'separate':  # the gain over the unseparated mixture, pair by pair, is the difference of the means
        assert written['SDRi'] == pytest.approx(written['SDR'] - written['SDR_mixture'])


def test_semantic_segmentation_and_multilabel(tmp_path):
    m = ft.main(['--task', 'segment', '--seg_classes', '8', '--output_dir', str(tmp_path / 's'),
                 '--max_steps', '1'] + SMALL)
    assert 0 <= m['mIoU'] <= 1 and 0 <= m['F'] <= 1
    m = ft.main(['--task', 'linprobe', '--multilabel', '--output_dir', str(tmp_path / 'm'), '--max_steps', '1'] + SMALL)
    assert set(m) >= {'mAP', 'AUC'}


def test_extract_rows_follow_the_manifest(tmp_path):
    from test_data import make_clips, write_manifest
    rows = make_clips(tmp_path, n=5, label=False)
    path = write_manifest(tmp_path / 'clips.csv', rows)
    ft.main(['--task', 'extract', '--data', str(path), '--output_dir', str(tmp_path / 'out'), '--batch_size', '2']
            + SMALL[:10] + ['--preset', 'tiny', '--num_workers', '0'])
    feats = np.load(tmp_path / 'out' / 'features_audio.npy')
    assert feats.shape == (5, 32)
    from data import ManifestDataset
    ds = ManifestDataset(path, 32, train=False)
    torch.manual_seed(0)
    encoder = DeepAVFusion(training.encoder_config(pretrain.parse_args(SMALL[:10] + ['--preset', 'tiny'])))
    x = ds[3]
    with torch.no_grad():
        direct = encoder(x['image'][None], x['audio'][None])[1].mean(1)[0]
    assert np.allclose(feats[3], direct.numpy(), atol=1e-5)


def test_init_from_this_projects_pretraining(tmp_path):
    pre = ['--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads', '2',
           '--decoder_dim', '16', '--decoder_depth', '1', '--decoder_num_heads', '2', '--synthetic_clips', '16',
           '--max_steps', '2', '--num_workers', '0', '--batch_size', '8', '--output_dir', str(tmp_path / 'pre')]
    pretrain.main(pre)
    ft.main(['--task', 'linprobe', '--init', str(tmp_path / 'pre'), '--output_dir', str(tmp_path / 'lp'),
             '--max_steps', '1', '--synthetic_clips', '16', '--batch_size', '8', '--num_workers', '0'])
    state = training.load_checkpoint(tmp_path / 'lp')['model']
    pre_state = training.load_checkpoint(tmp_path / 'pre')['model']
    assert torch.equal(state['encoder.image.blocks.1.mlp.fc1.weight'], pre_state['encoder.image.blocks.1.mlp.fc1.weight'])
    assert state['head.weight'].shape == (8, 64)  # 8 synthetic classes, image + audio features of width 32


def test_init_from_an_official_checkpoint(tmp_path):
    encoder = DeepAVFusion(training.encoder_config(pretrain.parse_args(SMALL)))
    official = {'state_dict': {f'encoder.{k}': v for k, v in encoder.state_dict().items()}, 'epoch': 200}
    torch.save(official, tmp_path / 'official.pth')
    m = ft.main(['--task', 'knn', '--init', str(tmp_path / 'official.pth'), '--output_dir', str(tmp_path / 'k')]
                + SMALL)
    assert 0 <= m['knn_audio'] <= 1
    with pytest.raises(ValueError, match='does not fit this model'):
        ft.main(['--task', 'knn', '--init', str(tmp_path / 'official.pth'), '--output_dir', str(tmp_path / 'k'),
                 '--embed_dim', '64'] + SMALL[2:])


@pytest.mark.parametrize('task,column', [('linprobe', 'label'), ('segment', 'mask'), ('localize', 'mask')])
def test_missing_task_column_is_named(tmp_path, task, column):
    from test_data import make_clips, write_manifest
    path = write_manifest(tmp_path / 'clips.csv', make_clips(tmp_path, n=3, label=False))
    with pytest.raises(ValueError, match=rf"no '{column}' column, which task '{task}' needs"):
        ft.main(['--task', task, '--data', str(path), '--val_data', str(path), '--output_dir', str(tmp_path / 'o')]
                + SMALL)


def test_layer_decay_scales():
    scale = ft.layer_decay_scale(12, 0.5)
    assert scale('head.weight') == 1 and scale('encoder.fusion_norm.weight') == 1
    assert scale('encoder.image.blocks.11.attn.qkv.weight') == 0.5
    assert scale('encoder.fusion_blocks.11.attn.q.weight') == 0.5
    assert scale('encoder.audio.blocks.0.norm1.weight') == 0.5 ** 12
    assert scale('encoder.fusion_tokens') == scale('encoder.image.patch_embed.proj.weight') == 0.5 ** 13


def test_recipes_per_task_and_preset():
    tiny = ft.parse_args(['--task', 'localize'])
    assert (tiny.preset, tiny.embed_dim, tiny.epochs, tiny.batch_size, tiny.lr) == ('tiny', 192, 5, 32, 1e-3)
    base = ft.parse_args(['--task', 'localize', '--preset', 'base', '--data', 'x.csv'])
    assert (base.embed_dim, base.epochs, base.batch_size, base.lr, base.weight_decay) == (768, 30, 128, 1e-4, 0)
    assert ft.parse_args(['--task', 'segment', '--preset', 'base']).epochs == 20
    assert ft.parse_args(['--task', 'finetune', '--preset', 'base']).layer_decay == 0.75
    assert ft.parse_args(['--task', 'linprobe']).input_norm is True
    assert ft.parse_args(['--task', 'linprobe', '--no-input_norm']).input_norm is False
    blr = ft.parse_args(['--task', 'linprobe', '--blr', '0.1'])
    assert blr.lr is None and blr.blr == 0.1  # an explicit base rate wins over the recipe's absolute one


def test_init_refuses_a_pickled_file_clearly(tmp_path):
    import argparse
    encoder = DeepAVFusion(training.encoder_config(pretrain.parse_args(SMALL)))
    torch.save({'model': encoder.state_dict(), 'args': argparse.Namespace(lr=1.0)}, tmp_path / 'pickled.pth')
    with pytest.raises(ValueError, match=r"pickled.pth: refused by torch.load\(weights_only=True\), it holds more "
                                         r"than tensors .*--no-weights_only"):
        ft.main(['--task', 'knn', '--init', str(tmp_path / 'pickled.pth'), '--output_dir', str(tmp_path / 'k')]
                + SMALL)
    m = ft.main(['--task', 'knn', '--init', str(tmp_path / 'pickled.pth'), '--no-weights_only',
                 '--output_dir', str(tmp_path / 'k')] + SMALL)  # the user's explicit choice for a trusted file
    assert 0 <= m['knn_image'] <= 1


# ---------------------------------------------------------------- one's own videos

def test_extract_on_a_folder_of_videos(tmp_path):
    from helpers import write_video
    (tmp_path / 'clips' / 'sub').mkdir(parents=True)
    write_video(tmp_path / 'clips' / 'b.mp4', seconds=7.0)
    write_video(tmp_path / 'clips' / 'sub' / 'a.mkv', seconds=3.5, video_codec='ffv1', audio_codec='pcm_s16le')
    m = ft.main(['--task', 'extract', '--data', str(tmp_path / 'clips'), '--output_dir', str(tmp_path / 'one')]
                + SMALL)
    assert m['clips'] == 2 and np.load(tmp_path / 'one' / 'features_fusion.npy').shape == (2, 32)
    rows = (tmp_path / 'one' / 'clips.csv').read_text().splitlines()
    assert 'b.mp4' in rows[1] and 'a.mkv' in rows[2]  # file order: b.mp4 before sub/a.mkv
    m = ft.main(['--task', 'extract', '--data', str(tmp_path / 'clips'), '--windows',
                 '--output_dir', str(tmp_path / 'win')] + SMALL)
    rows = (tmp_path / 'win' / 'clips.csv').read_text().splitlines()[1:]
    assert m['clips'] == 3 and [r.split(',')[-1] for r in rows] == ['0', '3', '0']  # 7 s: two windows; 3.5 s: one
    feats = np.load(tmp_path / 'win' / 'features_audio.npy')
    assert not np.allclose(feats[0], feats[1])  # the two windows of b.mp4 sound different


def test_localize_ones_own_video(tmp_path):
    from helpers import write_video
    video = write_video(tmp_path / 'my_clip.mp4', seconds=6.5)
    trained = ft.main(['--task', 'localize', '--output_dir', str(tmp_path / 'loc'), '--max_steps', '1'] + SMALL)
    assert 'cIoU' in trained
    m = ft.main(['--task', 'localize', '--init', str(tmp_path / 'loc'), '--data', str(video), '--windows',
                 '--output_dir', str(tmp_path / 'mine')] + SMALL)
    assert m['files'] == ['localization/my_clip_0000.00s.png', 'localization/my_clip_0003.00s.png']
    assert Image.open(tmp_path / 'mine' / m['files'][1]).width > 2 * 384
    with pytest.raises(ValueError, match=r"videos without a manifest work with --task extract or localize"):
        ft.main(['--task', 'linprobe', '--data', str(video), '--output_dir', str(tmp_path / 'x')] + SMALL)


def test_nearest_neighbour_leave_one_out_worked_example():
    # 4 clips; each clip's nearest other clip by cosine: 0 <-> 1 (labels 0, 0), 2 -> 3 (1 vs 0), 3 -> 2 (0 vs 1)
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 0])
    out = metrics.nearest_neighbour_loo({'image': image, 'audio': audio}, labels)
    assert out['nn_image'] == 0.5  # clips 0 and 1 right; 2 (-> 3) and 3 (-> 2) wrong
    # audio: 0 -> 3 (right), 1 -> 2 (wrong), 2 -> 1 (wrong), 3 -> 0 (right)
    assert out['nn_audio'] == 0.5
    # all, the summed similarities: 0 -> 3 (0.11 + 0.995 beats 0.994 + 0), right; 1 -> 2 (0.11 + 0.995), wrong;
    # 2 -> 3 (0.994 + 0.198), wrong; 3 -> 2, wrong
    assert out['nn_all'] == 0.25
    multi = metrics.nearest_neighbour_loo({'image': image}, torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]]))
    assert multi['nn_image_mAP'] == pytest.approx(1.0) and multi['nn_image_AUC'] == pytest.approx(1.0)


def test_maps_are_evaluated_on_the_whole_frame(tmp_path):
    """Segmentation (official) and localization (the Flickr-SoundNet maps cover the frame) resize the held-out frame
    to the input size, no 0.875 centre crop; classification keeps the crop; --no_train_augment trains on them so."""
    from media import write_audio
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :3] = 1  # an object along the left edge, which a 0.875 centre crop cuts away
    Image.fromarray(mask).save(tmp_path / 'm.png')
    Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2)).save(tmp_path / 'i.png')
    write_audio(tmp_path / 'a.wav', np.zeros(16000), 16000)
    (tmp_path / 'm.csv').write_text('image,audio,mask,label\n' + 'i.png,a.wav,m.png,x\n' * 4)
    seen = {}
    for task in ('segment', 'localize', 'linprobe'):
        args = ft.parse_args(['--task', task, '--data', str(tmp_path / 'm.csv'), '--val_data', str(tmp_path / 'm.csv'),
                              '--image_size', '32'])
        with training.processes(args) as ctx:
            _, val = ft.build_splits(args, ctx)
        item = val[0]
        seen[task] = item['mask'][:, 0].max().item() if 'mask' in item else \
            int(item['image'][:, :, 0].mean() > item['image'][:, :, -1].mean())  # the white edge still there?
    assert seen == {'segment': 1, 'localize': 1, 'linprobe': 0}
    for flags, augment in (([], True), (['--no_train_augment'], False)):  # training images as the held-out ones
        args = ft.parse_args(['--task', 'localize', '--data', str(tmp_path / 'm.csv'), '--val_data',
                              str(tmp_path / 'm.csv'), '--output_dir', str(tmp_path / 'out'), *flags])
        with training.processes(args) as ctx:
            train, val = ft.build_splits(args, ctx)
        assert train.image_fe.augment == augment and (train.image_fe.crop_ratio == 1.0) == (not augment)


def test_separation_pairs_follow_keys_not_manifest_order(tmp_path):
    from argparse import Namespace

    class Clips:  # what separation_pairs reads of a held-out manifest: its rows and their keys
        def __init__(self, keys):
            self.rows = [{'key': k} for k in keys]

        def __len__(self):
            return len(self.rows)

    (tmp_path / 'val_pairs.csv').write_text('source_1,source_2,class_1,class_2,sep_type\nb,d,x,y,Easy\nc,a,y,x,Hard\n')
    args = Namespace(sep_pairs='', val_data=str(tmp_path / 'val.csv'))
    for keys in ('abcd', 'dcba'):
        pairs, source = ft.separation_pairs(Clips(keys), args)
        assert [(keys[i], keys[j]) for i, j in pairs] == [('b', 'd'), ('c', 'a')] and source.endswith('val_pairs.csv')
    with pytest.raises(ValueError, match=r"1 clip\(s\) not in the held-out manifest's `key` column.*row 3: 'a'"):
        ft.separation_pairs(Clips('bcd'), args)
    pairs, source = ft.separation_pairs(Clips('abcde'), Namespace(sep_pairs='', val_data=str(tmp_path / 'other.csv')))
    assert pairs == [(0, 2), (1, 3)] and source.startswith('manifest order')
    with pytest.raises(FileNotFoundError, match='--sep_pairs nope.csv'):
        ft.separation_pairs(Clips('ab'), Namespace(sep_pairs='nope.csv', val_data=''))


# ---------------------------------------------------------------- --recipe official

OFFICIAL = ['--recipe', 'official'] + SMALL[:SMALL.index('--epochs')] + ['--epochs', '2'] + \
    SMALL[SMALL.index('--epochs') + 2:]  # 2 epochs: longer than every official tiny warm-up


@pytest.mark.parametrize('task', list(ft.TASKS))
def test_task_runs_end_to_end_with_the_official_recipe(tmp_path, task, monkeypatch):
    # Separation scored on 2 pairs, not 32: BSS-eval is most of the run's time, and the paper's run scores them all.
    monkeypatch.setattr(ft, 'separation_pairs', lambda val_set, args: ([(0, 32), (1, 33)], 'two pairs'))
    result = ft.main(['--task', task, '--output_dir', str(tmp_path), '--max_steps', '2'] + OFFICIAL)
    assert set(result) >= EXPECTED[task] and all(np.isfinite(result[k]) for k in EXPECTED[task] - {'clips', 'dim'})
    if not ft.TASKS[task].setup:
        return
    state = training.load_checkpoint(tmp_path)
    args = state['args']
    assert args['recipe'] == 'official'
    if task == 'linprobe':  # LARS (its momentum buffers), the three heads, each scored
        assert args['optimizer'] == 'lars' and 'mu' in next(iter(state['optimizer']['state'].values()))
        assert {'top1_image', 'top1_audio', 'top1_fusion'} <= set(result)
    if task == 'finetune':
        assert (args['mixup'], args['label_smoothing'], args['drop_path'], args['beta2']) == (1.0, 0.1, 0.2, 0.999)
        assert args['class_prior_init'] and args['class_weighted_loss'] and 'heads.fusion.bias' in state['model']
    if task == 'segment':  # 16 clips x 10 visits / batch 8 = 20 steps per epoch
        assert args['oversample'] == 10 and state['epoch'] == pytest.approx(2 / 20)
    if task == 'separate':
        assert args['sep_mask'] == 'ratio' and result['pairs_scored'] == 2


def test_official_recipe_values_are_the_official_commands():
    def base(task, *more):
        return ft.parse_args(['--task', task, '--preset', 'base', '--recipe', 'official', *more])
    lp = base('linprobe')
    assert (lp.optimizer, lp.blr, lp.lr, lp.epochs, lp.warmup_epochs, lp.batch_size, lp.weight_decay) == \
        ('lars', 0.3, None, 60, 10, 64, 0.0)
    assert (lp.heads, lp.feats, lp.input_norm) == ('per_feature', 'image+audio+fusion', True)
    ctx = training.Dist(0, 4, torch.device('cpu'))
    lp.accum_iter = 4  # the command: 64 per GPU x 4 accumulated x 4 GPUs -> lr 0.3 x 1024 / 256
    assert training.resolve_lr(lp, ctx) == 1024 and lp.lr == pytest.approx(1.2)
    fine = base('finetune')
    assert (fine.blr, fine.beta2, fine.weight_decay, fine.layer_decay, fine.drop_path, fine.mixup,
            fine.label_smoothing, fine.epochs, fine.warmup_epochs, fine.batch_size, fine.eval_windows) == \
        (3e-4, 0.999, 0.05, 0.75, 0.2, 1.0, 0.1, 100, 20, 32, 10)
    s4, avss = base('segment'), base('segment', '--seg_classes', '70')
    assert (s4.blr, s4.oversample, s4.epochs, s4.warmup_epochs, s4.batch_size) == (2e-4, 10, 100, 20, 16)
    assert (avss.blr, avss.oversample) == (3e-4, 5)
    sep = base('separate')
    assert (sep.blr, sep.epochs, sep.warmup_epochs, sep.sep_mask, sep.layer_decay) == (3e-4, 300, 40, 'ratio', 0.75)
    assert vars(base('localize')) == {**vars(ft.parse_args(['--task', 'localize', '--preset', 'base'])),
                                      'recipe': 'official'}
    paper = ft.parse_args(['--task', 'finetune'])  # today's defaults
    assert (paper.optimizer, paper.beta2, paper.mixup, paper.heads, paper.eval_windows) == ('adamw', 0.95, 0, 'one', 1)
    for row, parts in ft.RECIPES.items():  # no value outside COMMON (a typo would be a silent no-op)
        for part, d in parts.items():
            assert part in ('paper', 'paper tiny', 'paper base', 'official', 'official tiny', 'official base')
            assert set(d) <= set(ft.COMMON['tiny']), (row, part, d)
    assert ft.parse_args(['--task', 'finetune', '--recipe', 'official', '--mixup', '0']).mixup == 0  # flags win
    with pytest.raises(SystemExit):
        ft.parse_args(['--task', 'segment', '--oversample', '0'])


def test_audio_seconds_reaches_both_splits_and_is_refused_where_it_cannot_apply(capsys):
    args = ft.parse_args(['--task', 'localize', '--audio_seconds', '0.5', '--synthetic_clips', '64'])
    ctx = training.Dist(0, 1, torch.device('cpu'))
    assert [ds[0]['audio'].shape for ds in ft.build_splits(args, ctx)] == [(1, 128, 32)] * 2
    for argv in (['--task', 'localize', '--audio_seconds', '0'], ['--task', 'separate', '--audio_seconds', '3.5']):
        with pytest.raises(SystemExit):
            ft.parse_args(argv)
        assert 'must be in (0, 3]' in capsys.readouterr().err


def test_separation_mixes_and_scores_the_first_audio_seconds(tmp_path):
    # The U-Net's mask has the narrower spectrogram's columns (else the mask would not fit the mixture's STFT),
    # and the mixtures it separates and scores are the first 1 s of each window.
    m = ft.main(['--task', 'separate', '--audio_seconds', '1', '--output_dir', str(tmp_path), '--max_steps', '1']
                + SMALL)
    assert m['pairs_scored'] > 0 and np.isfinite(m['SDRi'])
    wave, rate = soundfile.read(tmp_path / 'separated' / '00_estimate1.wav')
    assert (len(wave), rate) == (16000, 16000)


def test_a_resumed_run_older_than_a_flag_takes_the_recipes_value(tmp_path):
    saved = {'task': 'linprobe', 'preset': 'tiny', 'recipe': 'official', 'epochs': 7, 'seg_classes': 1}
    training.save_checkpoint({'args': saved}, tmp_path / 'checkpoint.pt')
    args = ft.parse_args(['--resume', str(tmp_path)])  # the task is the run's, not asked again
    assert (args.task, args.epochs, args.optimizer, args.heads) == ('linprobe', 7, 'lars', 'per_feature')
    with pytest.raises(SystemExit):
        ft.parse_args(['--preset', 'tiny'])  # no task, nothing resumed


def test_lars_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = training.LARS([{'params': [w], 'weight_decay': 0.1}, {'params': [b], 'weight_decay': 0.0}], lr=2.0)
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5, 0.25])
    opt.step()
    # w: step g + 0.1 w = (0.9, 1.2), |step| 1.5, trust 0.001 x 5 / 1.5; mu = that; w -= 2 mu
    mu = torch.tensor([[0.9, 1.2]]) * 0.001 * 5 / 1.5
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 2 * mu)
    assert torch.allclose(b, torch.tensor([0.0, -1.5]))  # a bias: its gradient alone, no trust ratio
    w.grad, b.grad = torch.zeros(1, 2), torch.tensor([0.0, 0.0])
    w0 = w.detach().clone()
    step = 0.1 * w0 * 0.001 * w0.norm() / (0.1 * w0).norm()  # weight decay alone, trust-scaled
    opt.step()  # momentum 0.9: mu = 0.9 mu + step
    assert torch.allclose(w, w0 - 2 * (0.9 * mu + step))
    assert torch.allclose(b, torch.tensor([0.0, -1.5]) - 2 * 0.9 * torch.tensor([0.5, 0.25]))


def test_mixup_with_known_lambdas():
    image, audio = torch.arange(4.0).view(4, 1, 1, 1), 10 * torch.arange(4.0).view(4, 1, 1, 1)
    targets = ft.soft_targets(torch.tensor([0, 1, 2, 3]), 4, 0.0, False)
    lam = torch.tensor([1.0, 0.25, 0.5, 0.0])
    i, a, t = ft.mixup(image, audio, targets, lam)
    assert i.flatten().tolist() == [1 * 0 + 0 * 3, 0.25 * 1 + 0.75 * 2, 0.5 * 2 + 0.5 * 1, 0 * 3 + 1 * 0]
    assert torch.equal(a, 10 * i)
    assert t[1].tolist() == [0, 0.25, 0.75, 0] and t[3].tolist() == [1, 0, 0, 0]
    smooth = ft.soft_targets(torch.tensor([2]), 4, 0.1, False)  # 1 - 0.1 + 0.1 / 4 on, 0.1 / 4 off
    assert torch.allclose(smooth, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))
    logits = torch.randn(3, 4)  # soft targets give what PyTorch's label smoothing gives
    labels = torch.tensor([0, 3, 1])
    assert torch.allclose(ft.classification_loss(logits, ft.soft_targets(labels, 4, 0.1, False), False),
                          F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_class_prior_bias_and_weighted_loss():
    train = ft.build_dataset('synthetic', 32, True, synthetic_clips=16)
    for multilabel in (False, True):
        freq = ft.class_frequencies(train, multilabel)
        counts = torch.zeros(8)
        for i in range(16):
            item = train[i]
            counts += item['labels'] if multilabel else F.one_hot(item['label'], 8)
        assert torch.allclose(freq, counts / counts.sum())
        # sigmoid(bias) is the class's share, up to the official 1e-3 on both sides
        assert torch.allclose(torch.sigmoid(ft.prior_bias(freq)), (freq + 1e-3) / (1 + 2e-3), atol=1e-6)
    args = ft.parse_args(['--task', 'finetune'] + OFFICIAL)
    model, _, _ = ft.setup_classification(DeepAVFusion(training.encoder_config(args)), train, args,
                                          training.Dist(0, 1, torch.device('cpu')))
    assert all(torch.equal(h.bias, ft.prior_bias(ft.class_frequencies(train, False))) for h in model.linear_heads())
    # the weighted multi-label loss: classes never seen dropped, each term over its class's share
    logits, targets, freq = torch.randn(2, 3), torch.tensor([[1.0, 0, 0], [0, 0, 1]]), torch.tensor([0.25, 0.0, 0.75])
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    by_hand = torch.cat([bce[:, :1] / 0.25, bce[:, 2:] / 0.75], 1).mean()
    assert torch.allclose(ft.classification_loss(logits, targets, True, freq), by_hand)


def test_ratio_mask_and_its_weight():
    mix = heads.MixAndSeparate(torch.device('cpu'))
    t = torch.arange(48000) / 16000
    a, b = 0.3 * torch.sin(2 * np.pi * 300 * t), 0.1 * torch.sin(2 * np.pi * 3000 * t)
    log_mix, ratio, weight = mix.inputs(a[None], b[None], 'ratio')
    p_t, p_mix = mix.power(a[None]) + 1e-7, mix.power((a + b)[None]) + 1e-7  # official: 10 ** log10(p + 1e-7)
    assert torch.allclose(ratio, p_t / (p_t + p_mix + 1e-5))
    assert torch.allclose(weight, torch.log1p(p_mix - 1e-7).clamp(1e-3, 10))
    assert torch.allclose(log_mix[:, 0], torch.log10(p_mix))
    alone = (mix.power(b[None]) < 1e-4 * p_t) & (p_t > 1e-3)  # bins of the target alone
    assert alone.sum() > 100 and torch.allclose(ratio[alone], torch.tensor(0.5), atol=0.02)  # t / (t + t)
    _, binary, weight_binary = mix.inputs(a[None], b[None], 'binary')
    assert torch.equal(weight_binary, weight) and set(binary.unique().tolist()) == {0.0, 1.0}


def test_eval_windows_average_the_logits_of_windows_spread_over_the_clip(tmp_path):
    from data import window_start
    from media import write_audio
    assert [round(window_start(10.0, window=(k, 10)), 6) for k in (0, 1, 9)] == [0, round(7 / 9, 6), 7]
    assert (window_start(20.0, window=(0, 10)), window_start(20.0, window=(9, 10))) == (5, 12)  # the middle 10 s
    assert window_start(2.0, window=(5, 10)) == 0  # a clip shorter than a window: all at its start
    t = np.arange(160000) / 16000
    write_audio(tmp_path / 'a.wav', 0.05 * (1 + t) * np.sin(2 * np.pi * 440 * t))  # louder as it goes
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / 'i.png')
    (tmp_path / 'm.csv').write_text('image,audio,label\ni.png,a.wav,x\ni.png,a.wav,x\n')
    val = ft.build_dataset(str(tmp_path / 'm.csv'), 32, False)

    class Loudness(torch.nn.Module):
        def forward(self, image, audio):
            return audio.amax((1, 2, 3))[:, None]  # the tone's loudest bin

    args = ft.parse_args(['--task', 'finetune', '--num_workers', '0', '--amp', 'none'])
    ctx = training.Dist(0, 1, torch.device('cpu'))
    fn = lambda m, b: {'logits': m(b['image'], b['audio']), 'label': b['label']}  # noqa: E731
    out = ft.predict_windows(Loudness(), val, args, ctx, fn, 10)
    per_window = []
    for k in range(10):
        val.window = (k, 10)
        per_window.append(Loudness()(val[0]['image'][None], val[0]['audio'][None]))
    val.window = None
    per_window = torch.cat(per_window)[:, 0]
    assert (per_window.diff() > 0).all()  # ten different windows, later ones louder
    assert torch.allclose(out['logits'][:, 0], per_window.mean().expand(2), atol=1e-6)
    assert out['label'].tolist() == [0, 0] and val.window is None
    centred = ft.predict_windows(Loudness(), val, args, ctx, fn, 1)['logits'][0, 0]
    assert per_window[4] < centred < per_window[5]  # one window: the middle one (3.5 s)


def test_oversampling_makes_an_epoch_n_times_longer():
    from data import Oversampled
    train = ft.build_dataset('synthetic', 32, True, synthetic_clips=16)
    over = Oversampled(train, 3)
    assert len(over) == 48
    a, b = over[(2, 5)], over[(2, 5 + 16)]  # the same clip, visited twice in epoch 2
    assert a['index'] == b['index'] == 5 and not torch.equal(a['image'], b['image'])  # own augmentations
    assert torch.equal(a['image'], train[(6, 5)]['image'])  # visit 0 of epoch 2 = epoch 2 x 3 + 0
    args = ft.parse_args(['--task', 'segment'] + SMALL)
    ctx = training.Dist(0, 1, torch.device('cpu'))
    assert training.steps_per_epoch(len(over), args, ctx) == 3 * training.steps_per_epoch(len(train), args, ctx)


def test_sync_batchnorm_only_under_ddp_on_gpus():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    weight = model[1].weight
    assert training.sync_batchnorm(model, training.Dist(0, 2, torch.device('cpu'))) is model
    assert type(model[1]) is torch.nn.BatchNorm1d  # Gloo on CPUs: no SyncBatchNorm
    assert training.sync_batchnorm(model, training.Dist(0, 1, torch.device('cuda'))) is model
    assert type(model[1]) is torch.nn.BatchNorm1d
    out = training.sync_batchnorm(model, training.Dist(0, 2, torch.device('cuda')))
    assert isinstance(out[1], torch.nn.SyncBatchNorm) and out[1].weight is weight  # the same parameters


def test_help_shows_both_recipes():
    text = ft.get_parser().format_help().replace('\n', ' ')
    text = ' '.join(text.split())
    assert 'length of the run in epochs (tiny: 5; base: 20 (linprobe 50, finetune 50, localize 30); official tiny: ' \
           '5 (segment 1, AVSS 1); official base: 100 (linprobe 60, localize 30, separate 300))' in text
    assert "official tiny, official base: adamw (linprobe lars)" in text
    assert 'stochastic depth rate of every block (tiny, base: 0.0; official tiny, official base: 0.0 (finetune 0.2))' \
        in text
    assert 'None' not in text


def test_print_recipe_names_where_each_value_comes_from(capsys, tmp_path):
    def printed(*argv):
        with pytest.raises(SystemExit) as stop:
            ft.parse_args(['--print_recipe', *argv])
        assert stop.value.code == 0
        return {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()}
    rows = printed('--task', 'segment', '--preset', 'base', '--recipe', 'official', '--seg_classes', '70',
                   '--epochs', '70')
    assert rows['--epochs'] == ['70', 'command line']
    assert rows['--blr'] == ['0.0003', "finetune.RECIPES['AVSS']['official base']"]  # the AVSS row, over segment's
    assert rows['--oversample'] == ['5', "finetune.RECIPES['AVSS']['official']"]
    assert rows['--batch_size'] == ['16', "finetune.RECIPES['segment']['official base']"]
    assert rows['--lr'] == ['-', "finetune.RECIPES['segment']['official base']"]  # unset: from --blr
    assert rows['--embed_dim'] == ['768', "model.PRESETS['base']"]
    assert rows['--optimizer'] == ['adamw', "finetune.COMMON['base']"]
    assert rows['--knn_k'] == ['20', 'default (argparse)']
    assert '--print_recipe' not in rows
    training.save_checkpoint({'args': {'task': 'linprobe', 'preset': 'tiny', 'recipe': 'paper', 'epochs': 9}},
                             tmp_path / 'checkpoint.pt')
    resumed = printed('--task', 'linprobe', '--resume', str(tmp_path))
    assert resumed['--epochs'][0] == '9' and resumed['--epochs'][1].startswith('the resumed run')
    assert resumed['--input_norm'] == ['True', "finetune.RECIPES['linprobe']['paper']"]  # newer than the checkpoint
