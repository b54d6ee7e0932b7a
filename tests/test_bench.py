"""bench.py: the analytic FLOP count against torch's counter, the training-step and loader measurements."""
import argparse

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import pretrain
from model import get_config

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('fusion,separable', [('none', True), ('token', True), ('dense', True), ('dense', False),
                                              ('factorized', True), ('factorized', False)])
def test_step_flops_equal_torchs_count(fusion, separable):
    """step_flops, derived by hand, against FlopCounterMode on the tiny preset: forward, and forward + backward.
    The math attention kernel makes the attention products visible to the counter as matrix products."""
    args = pretrain.parse_args(['--preset', 'tiny', '--fusion', fusion,
                                '--separable' if separable else '--no-separable'])
    mae = pretrain.build_mae(args)
    B, c = 2, mae.encoder.config
    image, audio = torch.randn(B, 3, *c.image_hw), torch.randn(B, 1, *c.audio_size)
    noise = (torch.rand(B, mae.encoder.image.num_patches), torch.rand(B, mae.encoder.audio.num_patches))
    expected = bench.step_flops(c, args.decoder_dim, args.decoder_depth, args.image_mask_ratio,
                                args.audio_mask_ratio, B)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            out = mae(image, audio, *noise)
        with FlopCounterMode(display=False) as backward:
            (out['loss_image'] + out['loss_audio']).backward()
    assert forward.get_total_flops() == expected['forward']
    assert backward.get_total_flops() == expected['backward']
    assert expected['step'] == expected['forward'] + expected['backward']


def bench_args(*argv):
    p = bench.get_parser()
    args = p.parse_args(list(argv))
    args.batch_size = args.batch_size or bench.BATCH[args.preset]
    return args


def test_train_step_is_pretrainings_step_and_reports_throughput(monkeypatch):
    """--train measures pretrain.py's own step: its loss function runs (and the optimizer moves the weights)."""
    calls = []
    real = pretrain.pretraining_loss
    monkeypatch.setattr(pretrain, 'pretraining_loss', lambda out, a: calls.append(1) or real(out, a))
    args = bench_args('--train', '--preset', 'tiny', '--batch_size', '2', '--steps', '1', '--warmup', '1',
                      '--peak_tflops', '1')
    args.modes, args.rows = ['train'], ['token']
    r = bench.measure(args, 'token', True, 'train')
    assert len(calls) == 2 and r['samples_per_s'] > 0 and r['memory_mb'] >= 0
    flops = bench.step_flops(get_config('tiny', fusion='token'), 128, 2, 0.75, 0.8, 1)['step']
    assert r['gflop_per_sample'] == pytest.approx(flops / 1e9)
    assert r['mfu'] == pytest.approx(r['tflops'] / 1)
    table = bench.format_table({'token': {'train': r}}, args)
    assert '| token | ' in table and 'MFU' in table and 'GFLOP / clip' in table


def test_mfu_needs_a_known_peak_on_gpus(monkeypatch):
    args = argparse.Namespace(peak_tflops=0.0, device='cuda', amp='bf16')
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'NVIDIA H100 80GB HBM3')
    assert bench.default_peak_tflops(args) == 989.4
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'NVIDIA H100 PCIe')
    assert bench.default_peak_tflops(args) == 756.0
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Tesla T4')
    assert bench.default_peak_tflops(args) is None
    assert bench.default_peak_tflops(argparse.Namespace(peak_tflops=0.0, device='cuda', amp='none')) is None
    assert bench.default_peak_tflops(argparse.Namespace(peak_tflops=65.0, device='cuda', amp='none')) == 65.0


def test_loader_breakdown_on_made_inputs(tmp_path):
    """--make_inputs writes JPEG + WAV and video clips; --loader times them part by part, and the videos'
    extraction by prepare/extract.py beside them."""
    images, videos = bench.make_inputs(tmp_path, clips=2, seconds=4.0)
    r = bench.measure_loader(images, 224, clips=4, batch=2, warmup=1)
    assert set(r['ms_per_clip']) == {'prepare', 'spectrogram', 'collate'}
    assert all(v > 0 for v in r['ms_per_clip'].values())
    assert sum(r['ms_per_clip'].values()) == pytest.approx(1e3 / r['mean_clips_per_s'])
    v = bench.measure_loader(videos, 224, clips=4, batch=2, warmup=1)
    assert v['ms_per_clip']['prepare'] > r['ms_per_clip']['prepare']  # a video's frame costs more than a JPEG
    assert v['extract_clips_per_s'] > 0
    assert '| prepare/extract.py clips/s |' in bench.format_loader({'images': r, 'videos': v})
