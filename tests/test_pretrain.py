"""Pre-training and the shared machinery (training.py): recipes and flags, schedule, groups, sampler; resume
equals an uninterrupted run; DDP equals one process; a non-finite loss stops the run and keeps the checkpoint;
the files a run writes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pretrain
import training
from conftest import ROOT
from helpers import key_bias_mask
from mae import AVMAE
from model import DeepAVFusion

# A very small model and run: 16 clips, batch 4 -> 4 steps per epoch.
SMALL = ['--image_size', '32', '--embed_dim', '32', '--depth', '2', '--num_heads', '2', '--fusion_num_heads', '2',
         '--decoder_dim', '16', '--decoder_depth', '1', '--decoder_num_heads', '2', '--synthetic_clips', '16',
         '--epochs', '3', '--warmup_epochs', '1', '--log_interval', '1', '--blr', '1e-2', '--batch_size', '4']


def run(tmp_path, name, *flags):
    out = tmp_path / name
    pretrain.main(SMALL + ['--output_dir', str(out), *flags])
    return out


def log(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def weights(out):
    return training.load_checkpoint(out)['model']


def test_a_preset_is_a_whole_recipe_whatever_the_data():
    for data in ([], ['--data', 'train.csv']):
        tiny = pretrain.parse_args(data)
        assert (tiny.preset, tiny.embed_dim, tiny.depth, tiny.image_size) == ('tiny', 192, 4, 96)
        assert (tiny.decoder_dim, tiny.decoder_depth, tiny.epochs, tiny.warmup_epochs, tiny.batch_size,
                tiny.blr) == (128, 2, 3, 0.5, 32, 5e-3)
        base = pretrain.parse_args(data + ['--preset', 'base'])
        assert (base.embed_dim, base.depth, base.image_size, base.fusion, base.fusion_layers) == \
               (768, 12, 224, 'factorized', 'all')
        assert (base.epochs, base.warmup_epochs, base.blr, base.weight_decay, base.batch_size) == \
               (200, 40, 1.5e-4, 0.05, 64)
        assert (base.decoder_dim, base.decoder_depth, base.decoder_num_heads) == (512, 8, 16)
        assert (base.image_mask_ratio, base.audio_mask_ratio, base.norm_pix_loss) == (0.75, 0.8, True)
    # any flag overrides its preset's value; the encoder's flags are DeepAVFusionConfig's fields
    args = pretrain.parse_args(['--preset', 'base', '--epochs', '3', '--warmup_epochs', '1', '--fusion', 'dense',
                                '--no-separable', '--decoder_dim', '64'])
    assert (args.epochs, args.warmup_epochs, args.decoder_dim, args.depth) == (3, 1, 64, 12)
    config = training.encoder_config(args)
    assert (config.fusion, config.separable, config.embed_dim) == ('dense', False, 768)
    assert {f.name for f in training.encoder_fields()} == set(config.__dataclass_fields__) - {'audio_size'}


def test_help_shows_each_presets_value(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert 'decoder width (tiny: 128; base: 512; avmae base: 384)' in text  # a system's row at a preset
    assert 'length of the run in epochs (tiny: 3; base: 200; avmae base: 400)' in text
    assert 'hidden image patches (deepavfusion, cavmae: 0.75; avmae: 0.9)' in text
    assert 'token width D of all three branches (tiny: 192; base: 768)' in text
    assert 'None' not in text


def test_warmup_not_shorter_than_the_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(['--preset', 'base', '--epochs', '30'])
    assert '--warmup_epochs 40 is not shorter than --epochs 30' in capsys.readouterr().err


def test_data_that_make_no_step_are_refused_before_any_work(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(pretrain, 'build_mae', lambda args: built.append(1))
    with pytest.raises(ValueError, match=r"16 clips make no full step of --batch_size 32"):
        pretrain.main(SMALL + ['--batch_size', '32', '--output_dir', str(tmp_path)])
    assert not built


def test_schedule_and_ramp():
    args = pretrain.parse_args(['--epochs', '10', '--warmup_epochs', '2', '--lr', '1.0', '--min_lr', '0.1'])
    assert training.lr_at(0, 100, args) == 0 and training.lr_at(100, 100, args) == pytest.approx(0.5)
    assert training.lr_at(200, 100, args) == pytest.approx(1.0)
    assert training.lr_at(600, 100, args) == pytest.approx(0.55)  # half way through the cosine
    assert training.lr_at(1000, 100, args) == pytest.approx(0.1)
    assert training.ramp_at(0, 1000) == 0 and training.ramp_at(250, 1000) == pytest.approx(0.5)
    assert training.ramp_at(500, 1000) == 1 and training.ramp_at(900, 1000) == 1


def test_param_groups_decay_and_ramp():
    mae = AVMAE(DeepAVFusion(training.encoder_config(pretrain.parse_args([]))), 16, 1, 2)
    groups = training.param_groups(mae.named_parameters(), 0.05, ramp_prefixes=['encoder.image.'])
    where = {id(p): g for g in groups for p in g['params']}
    named = dict(mae.named_parameters())
    assert where[id(named['encoder.fusion_tokens'])]['weight_decay'] == 0.05  # decayed, as the official code
    assert where[id(named['image_decoder_mask_token'])]['weight_decay'] == 0.05
    assert where[id(named['encoder.image.blocks.0.norm1.weight'])]['weight_decay'] == 0
    assert where[id(named['encoder.audio.blocks.0.attn.qkv.bias'])]['weight_decay'] == 0
    assert where[id(named['encoder.image.blocks.0.attn.qkv.weight'])]['ramp']
    assert not where[id(named['encoder.audio.blocks.0.attn.qkv.weight'])]['ramp']
    assert sum(len(g['params']) for g in groups) == len(named)


def test_sampler_shards_make_the_one_process_batches():
    # 21 clips, batch 3 per process x 3 processes (or 9 in one): 2 steps per epoch, 3 epochs
    one = list(training.RunSampler(21, 0, 1, seed=3, per_epoch=18, stop=54))
    shards = [list(training.RunSampler(21, r, 3, seed=3, per_epoch=6, stop=18)) for r in range(3)]
    assert len(one) == 54 and all(len(s) == 18 for s in shards)
    for b in range(6):  # batch 3 per process == batch 9 in one process, in every epoch
        assert sorted(sum((s[3 * b:3 * b + 3] for s in shards), [])) == sorted(one[9 * b:9 * b + 9])
    assert [e for e, _ in one] == [0] * 18 + [1] * 18 + [2] * 18  # every index tagged with its epoch
    assert [i for _, i in one[:18]] != [i for _, i in one[18:36]]  # a new order each epoch
    assert len({i for _, i in one[:18]}) == 18  # no clip twice in an epoch
    resumed = training.RunSampler(21, 1, 3, seed=3, per_epoch=6, start=4, stop=18)  # from mid-epoch 0
    assert list(resumed) == shards[1][4:] and len(resumed) == 14


def test_resume_equals_uninterrupted_run(tmp_path):
    full = run(tmp_path, 'full', '--max_steps', '10', '--num_workers', '0')
    part = run(tmp_path, 'part', '--max_steps', '6', '--num_workers', '2')  # stops mid-epoch 1
    assert training.load_checkpoint(part)['step'] == 6
    pretrain.main(['--resume', str(part), '--max_steps', '10', '--num_workers', '1'])
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r['loss'] for r in log(full)] == [r['loss'] for r in log(part)]
    assert [r['step'] for r in log(part)] == list(range(1, 11))


def test_device_frontend_trains_the_same_function(tmp_path):
    """--device_frontend (the loader hands over 8-bit crops and waveforms, the training device normalises and
    makes the spectrograms) gives the default run's losses. Like --num_workers, it is the session's choice: a
    resumed run takes it from its own command line."""
    default = run(tmp_path, 'default', '--max_steps', '3', '--num_workers', '0')
    device = run(tmp_path, 'device', '--max_steps', '3', '--num_workers', '1', '--device_frontend')
    assert [r['loss'] for r in log(device)] == pytest.approx([r['loss'] for r in log(default)], rel=1e-5)
    assert 'device_frontend' in training.SESSION_FLAGS


def test_resume_keeps_the_runs_flags(tmp_path, capsys):
    out = run(tmp_path, 'run', '--max_steps', '2', '--num_workers', '0')
    args = pretrain.parse_args(['--resume', str(out), '--blr', '5', '--max_steps', '4'])
    assert args.blr == 1e-2 and args.max_steps == 4 and args.embed_dim == 32
    assert '--resume: keeping the run\'s --blr=0.01 (ignoring 5.0)' in capsys.readouterr().err


def test_outputs_of_a_run(tmp_path):
    out = run(tmp_path, 'run', '--max_steps', '5', '--num_workers', '0')
    assert {p.name for p in out.iterdir()} >= {'checkpoint.pt', 'log.jsonl', 'loss_curve.png',
                                               'reconstructions.png'}
    rec = Image.open(out / 'reconstructions.png')
    assert rec.height > 4 * 32 and rec.width > 3 * 192  # four clips; image and spectrogram triplets
    ckpt = training.load_checkpoint(out)
    assert ckpt['step'] == 5 and ckpt['args']['embed_dim'] == 32 and 'optimizer' in ckpt
    rows = log(out)
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]
    assert all(set(r) >= {'loss', 'loss_image', 'loss_audio', 'lr', 'epoch'} for r in rows)
    encoder = DeepAVFusion(training.encoder_config(pretrain.parse_args(SMALL)))
    encoder.load_checkpoint(out / 'checkpoint.pt')  # the encoder loads straight from a training checkpoint


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    out = run(tmp_path, 'run', '--max_steps', '4', '--num_workers', '0')  # one epoch: checkpoint at step 4
    before = (out / 'checkpoint.pt').read_bytes()
    real = AVMAE.forward

    def broken(self, *a, **k):
        out = real(self, *a, **k)
        return {**out, 'loss_image': out['loss_image'] * float('nan')}

    monkeypatch.setattr(AVMAE, 'forward', broken)
    with pytest.raises(SystemExit) as e:
        pretrain.main(['--resume', str(out), '--max_steps', '8'])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert 'non-finite loss at step 5 (epoch 1): ' in err and 'loss_image=nan' in err
    assert 'checkpoint.pt is kept' in err
    assert (out / 'checkpoint.pt').read_bytes() == before


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pt'
    training.save_checkpoint({'step': 1}, path)

    def crash(obj, f):
        f.write(b'partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint({'step': 2}, path)
    assert torch.load(path, weights_only=True)['step'] == 1


def test_pretrain_on_a_manifest_with_a_bad_clip(tmp_path):
    rows = ['image,audio']
    rng = np.random.default_rng(0)
    from media import write_audio
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f'{i}.jpg')
        write_audio(tmp_path / f'{i}.wav', rng.uniform(-0.5, 0.5, 4000), 8000)
        rows.append(f'{i}.jpg,{i}.wav')
    data = (tmp_path / '3.jpg').read_bytes()
    (tmp_path / '3.jpg').write_bytes(data[:len(data) // 2])  # header intact: fails only when decoded
    (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
    flags = ['--data', str(tmp_path / 'train.csv'), '--preset', 'tiny', '--epochs', '1', '--warmup_epochs', '0.5',
             '--batch_size', '4', '--num_workers', '0'] + SMALL[:14]
    with pytest.raises(RuntimeError, match=r"row 5 \(image '3.jpg', audio '3.wav'\): could not decode"):
        pretrain.main(flags + ['--output_dir', str(tmp_path / 'strict')])
    with pytest.warns(UserWarning, match='3.jpg'):
        last = pretrain.main(flags + ['--output_dir', str(tmp_path / 'skip'), '--skip_bad'])
    assert last['step'] == 2  # the run goes on without the clip, never with another in its place
    assert sum(r.get('skipped_clips', 0) for r in log(tmp_path / 'skip')) == 1
    report = (tmp_path / 'skip' / 'left_out.csv').read_text()
    assert "5,\"image '3.jpg', audio '3.wav'\",could not decode" in report


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 processes (Gloo) x batch 2 equals 1 process x batch 4, with gradient accumulation."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    common = SMALL + ['--max_steps', '3', '--accum_iter', '2', '--num_workers', '0']
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    str(ROOT / 'pretrain.py'), *common, '--batch_size', '2', '--output_dir', str(tmp_path / 'two')],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / 'pretrain.py'), *common, '--batch_size', '4',
                    '--output_dir', str(tmp_path / 'one')], check=True, env=env, cwd=tmp_path, capture_output=True)
    one, two = log(tmp_path / 'one'), log(tmp_path / 'two')
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for k in ('loss', 'loss_image', 'loss_audio', 'lr'):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a, b)
    wa, wb = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    for k in wa:
        key_bias = key_bias_mask(k, wa[k])  # true gradient 0: Adam turns rounding noise into updates there
        keep = ~key_bias if key_bias is not None else torch.ones_like(wa[k], dtype=torch.bool)
        assert keep.any() or k.endswith('attn.k.bias')
        if keep.any():
            assert (wa[k][keep] - wb[k][keep]).abs().max() <= 1e-5, k
    torch.manual_seed(0)  # the initial weights, as main() builds them: the runs did move away from them
    initial = pretrain.build_mae(pretrain.parse_args(SMALL)).state_dict()
    assert max((wa[k] - initial[k]).abs().max() for k in wa) > 1e-4  # 10x the tolerance above
    assert training.load_checkpoint(tmp_path / 'two')['args']['batch_size'] == 2


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_runs(tmp_path, amp):
    out = run(tmp_path, amp, '--max_steps', '3', '--num_workers', '0', '--amp', amp)
    assert all(np.isfinite(r['loss']) for r in log(out))
    ckpt = training.load_checkpoint(out)
    assert ckpt['args']['amp'] == amp
    assert bool(ckpt['scaler']) == (amp == 'fp16')  # fp16 trains with a GradScaler, and saves its scale


def test_a_new_loss_term_is_one_place(tmp_path, monkeypatch):
    """Forking the loss: a term computed from AVMAE.forward's outputs is trained on, logged and plotted."""
    real = pretrain.pretraining_loss

    def with_alignment(out, args):
        loss, terms = real(out, args)
        # e.g. pull the pooled image and audio tokens together: everything the term needs is in `out`
        terms['loss_align'] = 0.1 * (1 - F.cosine_similarity(out['x_image'].mean(1), out['x_audio'].mean(1))).mean()
        return sum(terms.values()), terms

    monkeypatch.setattr(pretrain, 'pretraining_loss', with_alignment)
    out = run(tmp_path, 'run', '--max_steps', '4', '--num_workers', '0')
    rows = log(out)
    assert all('loss_align' in r and r['loss'] == pytest.approx(r['loss_image'] + r['loss_audio'] + r['loss_align'],
                                                               abs=1e-5) for r in rows)
    from plots import plot_log
    assert plot_log(out / 'log.jsonl', tmp_path / 'curve.png') == ['loss', 'loss_align', 'loss_audio', 'loss_image']


@pytest.mark.skipif(not (shutil.which('g++') or shutil.which('c++')), reason='torch.compile on a CPU needs a C++ '
                                                                          'compiler')
def test_compile_trains_the_same_function(tmp_path, monkeypatch, one_thread):
    """--compile (torch.compile, inductor): two steps give the eager losses and weights to float rounding. The
    slowest of the new tests: 50 s on 2 busy cores the first time (C++ kernels compiled with g++), 17 s once
    they are in inductor's cache (/tmp/torchinductor_<user>)."""
    # One C++ module per graph rather than one per kernel: the same kernels, compiled in about half the time.
    monkeypatch.setattr(torch._inductor.config, 'cpp_wrapper', True)
    flags = ['--depth', '1', '--max_steps', '2', '--num_workers', '0']
    eager, compiled = run(tmp_path, 'eager', *flags), run(tmp_path, 'compiled', *flags, '--compile')
    torch._dynamo.reset()
    assert [r['step'] for r in log(compiled)] == [1, 2]
    for a, b in zip(log(eager), log(compiled)):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-5, abs=1e-6)
    a, b = weights(eager), weights(compiled)
    assert a.keys() == b.keys()  # compiled in place: the checkpoint is the module's own
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_loader_workers_start_once_per_run(tmp_path, monkeypatch):
    made = []
    real = training.DataLoader

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(k.get('sampler'))
            super().__init__(*a, **k)

    monkeypatch.setattr(training, 'DataLoader', Counting)
    out = run(tmp_path, 'run', '--num_workers', '1', '--knn_every', '1')  # 3 epochs, 4 k-NN passes
    assert len([r for r in log(out) if 'knn_image' in r]) == 4
    # one training loader for the run, one evaluation loader (persistent workers) for every k-NN pass
    samplers = [m for m in made if m is not None]
    assert len(made) == 2 and len(samplers) == 1 and isinstance(samplers[0], training.RunSampler)
    assert len(samplers[0]) == 3 * 16


def test_knn_monitor_logs_and_plots_fig3(tmp_path):
    out = run(tmp_path, 'run', '--knn_every', '1', '--num_workers', '0')  # 3 epochs; synthetic held-out clips
    rows = [r for r in log(out) if 'knn_image' in r]
    assert [r['epoch'] for r in rows] == [0, 1, 2, 3]  # before training, then after every epoch
    assert all(0 <= r[f'knn_{f}'] <= 1 for r in rows for f in ('image', 'audio', 'fusion', 'all'))
    from plots import plot_log
    assert plot_log(out / 'log.jsonl', tmp_path / 'curve.png')[-4:] == ['knn_all', 'knn_audio', 'knn_fusion',
                                                                        'knn_image']
    with pytest.raises(SystemExit):
        pretrain.parse_args(['--data', 'train.csv', '--knn_every', '1'])  # a manifest needs --knn_data


def test_print_recipe_shows_each_value_and_its_source(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(['--preset', 'base', '--print_recipe', '--seed', '3'])
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows['--decoder_dim'] == ['512', "pretrain.RECIPES['base']"]
    assert rows['--epochs'] == ['200', "pretrain.RECIPES['base']"]
    assert rows['--embed_dim'] == ['768', "model.PRESETS['base']"]
    assert rows['--seed'] == ['3', 'command line']
    assert rows['--image_mask_ratio'] == ['0.75', "pretrain.SYSTEMS['deepavfusion']"]
    assert rows['--norm_pix_loss'] == ['True', "pretrain.SYSTEMS['deepavfusion']"]


# ------------------------------------------------------------------ runs that survive a lost worker (--resume auto)

RESTARTABLE = ['--num_workers', '0', '--save_every', '3', '--resume', 'auto']  # 4 steps an epoch: 3, 6, 9 mid-epoch


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The run of RESTARTABLE's flags without a crash (12 steps), for the tests below to end where it ends."""
    out = tmp_path_factory.mktemp('uninterrupted')
    pretrain.main(SMALL + RESTARTABLE + ['--output_dir', str(out)])
    return out


def crash_at(monkeypatch, crash_step):
    """The process dies (an exception) at the start of optimizer step `crash_step` (1-based)."""
    real = training.train_step

    def train_step(args, ctx, net, batches, loss_fn, epoch, step, *rest):
        if step + 1 == crash_step:
            raise RuntimeError('worker lost')
        return real(args, ctx, net, batches, loss_fn, epoch, step, *rest)

    monkeypatch.setattr(training, 'train_step', train_step)


def test_resume_auto_continues_mid_epoch_and_ends_where_the_run_ends(tmp_path, monkeypatch, capsys, uninterrupted):
    """The same command starts the run, and after a crash mid-epoch continues it from the --save_every
    checkpoint (step 6, epoch 1.5): weights bitwise those of the uninterrupted run, the same log lines."""
    flags = SMALL + RESTARTABLE + ['--output_dir', str(tmp_path / 'run')]
    with monkeypatch.context() as m:
        crash_at(m, 8)
        with pytest.raises(RuntimeError, match='worker lost'):
            pretrain.main(flags)
    assert 'no checkpoint in' in capsys.readouterr().err
    assert training.load_checkpoint(tmp_path / 'run')['step'] == 6  # the previous one kept beside it
    assert torch.load(tmp_path / 'run' / training.PREVIOUS, weights_only=True)['step'] == 4
    pretrain.main(flags)
    assert f"continuing from {tmp_path / 'run' / 'checkpoint.pt'}" in capsys.readouterr().err
    a, b = weights(uninterrupted), weights(tmp_path / 'run')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda out: [(r['step'], r['loss']) for r in log(out)]  # noqa: E731
    assert rows(uninterrupted) == rows(tmp_path / 'run')
    assert [r['step'] for r in log(uninterrupted)] == list(range(1, 13))


def test_a_truncated_checkpoint_is_refused_by_name_and_skipped_by_auto(tmp_path, capsys, uninterrupted):
    out = tmp_path / 'run'
    pretrain.main(SMALL + RESTARTABLE + ['--output_dir', str(out), '--max_steps', '6'])
    data = (out / 'checkpoint.pt').read_bytes()
    (out / 'checkpoint.pt').write_bytes(data[:len(data) // 2])  # a copy cut short
    with pytest.raises(SystemExit, match=f"checkpoint {out / 'checkpoint.pt'} cannot be read"):
        pretrain.main(['--resume', str(out)])
    pretrain.main(SMALL + RESTARTABLE + ['--output_dir', str(out)])  # from the previous one, step 4
    err = capsys.readouterr().err
    assert f"continuing from {out / training.PREVIOUS} ({out / 'checkpoint.pt'} cannot be read" in err
    a, b = weights(uninterrupted), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ('checkpoint.pt', training.PREVIOUS):  # nothing readable left: refused, never overwritten
        (out / name).write_bytes(data[:100])
    with pytest.raises(SystemExit, match='no checkpoint in .* can be read'):
        pretrain.main(SMALL + RESTARTABLE + ['--output_dir', str(out)])
    assert (out / 'checkpoint.pt').read_bytes() == data[:100]


def test_resume_auto_in_finetune_too(tmp_path, uninterrupted):
    import finetune
    new = finetune.parse_args(['--task', 'linprobe', '--resume', 'auto', '--output_dir', str(tmp_path)])
    assert new.resume == ''
    with pytest.raises(SystemExit, match='no checkpoint in .* can be read'):  # checked, as in pre-training
        (tmp_path / 'checkpoint.pt').write_bytes((uninterrupted / 'checkpoint.pt').read_bytes()[:200])
        finetune.parse_args(['--task', 'linprobe', '--resume', 'auto', '--output_dir', str(tmp_path)])


def worker_pid(marker, rank):
    """The pid of the torchrun worker of `rank` started with the environment variable RESTART_TEST=marker."""
    for proc in Path('/proc').iterdir():
        try:
            env = (proc / 'environ').read_bytes().split(b'\0')
            cmdline = (proc / 'cmdline').read_bytes()
        except OSError:  # not ours, or gone
            continue
        if f'RESTART_TEST={marker}'.encode() in env and f'RANK={rank}'.encode() in env and b'pretrain.py' in cmdline:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='finds the worker through /proc (Linux)')
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_where_it_would(tmp_path):
    """torchrun --max-restarts=2 with --resume auto: worker 1 SIGKILLed during the run, torchrun restarts the
    group with the same command, which continues from the last checkpoint; the weights at the end are those of
    the same 2-process run without the kill, bitwise."""
    flags = SMALL + RESTARTABLE + ['--epochs', '6', '--batch_size', '2']  # 2 processes x 2 clips: 24 steps

    def torchrun(name):
        # Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted group hung or failed in 2 of 8 tries
        # (pytorch issue 135712): the documented command sets it.
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'RESTART_TEST': name,
               'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
        return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                                 '--max-restarts=2', str(ROOT / 'pretrain.py'), *flags,
                                 '--output_dir', str(tmp_path / name)],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    marker = f"killed-{os.getpid()}-{tmp_path.name}"
    run = torchrun(marker)
    deadline = time.time() + 300
    while len(training.read_log(tmp_path / marker / 'log.jsonl')) < 4 and run.poll() is None:
        assert time.time() < deadline, 'the run did not reach step 4'
        time.sleep(0.02)
    pid = worker_pid(marker, 1)  # step 4 logged: the checkpoint of step 3 is complete
    assert pid and training.read_log(tmp_path / marker / 'log.jsonl')[-1]['step'] < 24
    os.kill(pid, signal.SIGKILL)
    try:
        output = run.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # the agent and its workers: a session of their own
        raise
    assert run.returncode == 0, output
    resumed = [int(line.split(' at step ')[1].split()[0]) for line in output.splitlines() if 'resumed ' in line]
    assert len(resumed) == 1 and 3 <= resumed[0] < 24, output  # restarted once, from a checkpoint of the run
    whole = torchrun('whole')
    assert whole.wait(timeout=300) == 0, whole.communicate()[0]
    a, b = weights(tmp_path / 'whole'), weights(tmp_path / marker)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r['loss'] for r in log(tmp_path / 'whole')] == [r['loss'] for r in log(tmp_path / marker)]
