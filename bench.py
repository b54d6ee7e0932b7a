"""Speed and memory: the encoder per fusion type (the paper's Table 5), the whole pre-training step, and the data
pipeline. Method and measured figures: docs/speed.md.

    python bench.py --preset base                              # encoder: forward, forward + backward (Table 5)
    python bench.py --train --preset tiny                      # pre-training step: clips/s, memory, TFLOP/s
    python bench.py --train --preset base --device cuda --amp bf16 --compile   # ... and MFU on a GPU
    python bench.py --make_inputs inputs/                      # clips to measure the loader on
    python bench.py --loader --data inputs/images.csv inputs/videos.csv

Each row (fusion type and form) and mode runs in a fresh process, so peak memory is that row's alone; times are the
median step after the warm-up. --train times pretrain.py's own optimizer step, built by its code, on a batch already
on the device, its FLOPs counted analytically (`step_flops`). --loader times one loader worker on one core."""
import argparse
import itertools
import json
import multiprocessing as mp
import resource
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import training
from model import DeepAVFusion, get_config

ROWS = [('none', 'none', True), ('token', 'token', True),  # (label, fusion, separable)
        ('dense literal', 'dense', False), ('dense separable', 'dense', True),
        ('factorized literal', 'factorized', False), ('factorized separable', 'factorized', True)]
TRAIN_ROWS = ('none', 'token', 'dense separable', 'factorized separable')  # --train's default rows
MODES = ('fwd', 'fwd+bwd', 'train')
BATCH = {'tiny': 32, 'base': 4}  # default --batch_size per preset
# Dense bf16 / fp16 tensor-core peak of GPUs known by name, TFLOP/s (vendor data sheets; SXM unless named).
PEAK_TFLOPS = [('H100 PCIe', 756.0), ('H100 NVL', 835.0), ('H100', 989.4), ('H200', 989.4), ('A100', 312.0)]


def current_rss_mb():
    """Resident set size of this process now, in MiB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# ---------------------------------------------------------------------------------------------------- FLOPs

def linear_flops(n, d_in, d_out):
    """A linear map of n tokens: one multiply and one add per weight and token."""
    return 2 * n * d_in * d_out


def attention_flops(n_q, n_k, d_k, d_v):
    """Scores (n_q x n_k dot products of width d_k) and the weighted sum of values (width d_v), all heads."""
    return 2 * n_q * n_k * (d_k + d_v)


def block_flops(n, dim, mlp_ratio):
    """A pre-norm transformer block on n tokens: qkv, scores, weighted sum, projection, MLP."""
    hidden = int(dim * mlp_ratio)
    return (linear_flops(n, dim, 3 * dim) + attention_flops(n, n, dim, dim) + linear_flops(n, dim, dim)
            + 2 * linear_flops(n, dim, hidden))


def fusion_block_flops(c, n_image, n_audio):
    """One fusion block (fusion.FusionBlock) of config c, given the image and audio tokens it reads."""
    D, r, T = c.embed_dim, int(c.embed_dim * c.fusion_attn_ratio), sum(c.fusion_tokens_split)
    mlp = 2 * linear_flops(T, D, int(D * c.fusion_mlp_ratio))  # over all T tokens
    literal = not c.separable and c.fusion != 'token'  # keys and values over the n_audio x n_image pairs
    if c.fusion in ('token', 'dense'):  # the T tokens attend in width r to the tokens (separable) or the pairs
        n, d_in = (n_audio * n_image, 2 * D) if literal else (n_image + n_audio, D)
        return (linear_flops(T, D, r) + linear_flops(n, d_in, 2 * r) + attention_flops(T, n, r, r)
                + linear_flops(T, r, D) + mlp)
    F, Av, Aa = c.fusion_tokens_split  # factorized: aggregation (Eq. 9-10), then pairs of aggregation tokens
    aggregate = sum(2 * linear_flops(A, D, D) + linear_flops(n, D, 2 * D) + attention_flops(A, n, D, D)
                    for A, n in ((Av, n_image), (Aa, n_audio)))
    n, d_in = (Av * Aa, 2 * D) if literal else (Av + Aa, D)  # keys of width r, values of width D
    return (aggregate + linear_flops(F, D, r) + linear_flops(n, d_in, r + D) + attention_flops(F, n, r, D)
            + linear_flops(F, D, D) + mlp)


def step_flops(c, decoder_dim, decoder_depth, image_mask_ratio, audio_mask_ratio, batch):
    """{'forward', 'backward', 'step'}: FLOPs of the matrix products of one pre-training step of `batch` clips."""
    # c is the encoder's config. Element-wise work (norms, softmax, GELU, the loss, AdamW) is not counted, as usual
    # for MFU.
    p, D, Dd, T = c.patch_size, c.embed_dim, decoder_dim, sum(c.fusion_tokens_split)
    N_image, N_audio = [(h // p) * (w // p) for h, w in (c.image_hw, c.audio_size)]
    n_image, n_audio = int(N_image * (1 - image_mask_ratio)), int(N_audio * (1 - audio_mask_ratio))
    # Every patch is embedded (the official order: embed, then keep the visible ones).
    embed = linear_flops(N_image, 3 * p * p, D) + linear_flops(N_audio, p * p, D)
    encoder = 0
    for layer in range(c.depth):
        fused = layer in c.fusion_layer_ids  # the branches' blocks then also see the T fusion tokens
        encoder += block_flops(n_image + fused * T, D, c.mlp_ratio) + block_flops(n_audio + fused * T, D, c.mlp_ratio)
        encoder += fusion_block_flops(c, n_image, n_audio) if fused else 0
    decoders = sum(linear_flops(n + T, D, Dd) + decoder_depth * block_flops(N + T, Dd, 4.0)
                   + linear_flops(N, Dd, p * p * channels)
                   for n, N, channels in ((n_image, N_image, 3), (n_audio, N_audio, 1)))
    forward = batch * (embed + encoder + decoders)
    # Backward: gradients of the inputs and of the weights, twice the forward, except for the patch embedding,
    # whose input (image, spectrogram) needs no gradient.
    backward = 2 * forward - batch * embed
    return {'forward': forward, 'backward': backward, 'step': forward + backward}


def default_peak_tflops(args):
    """--peak_tflops, or the dense bf16/fp16 peak of a known GPU under --amp bf16/fp16; else None."""
    if args.peak_tflops or not args.device.startswith('cuda') or args.amp == 'none':
        return args.peak_tflops or None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------- the model

def train_step_fn(args, fusion, separable, device):
    """(step function, its FLOPs): one optimizer step of pre-training as pretrain.py runs it, on a fixed batch."""
    import pretrain
    flags = ['--preset', args.preset, '--fusion', fusion, '--separable' if separable else '--no-separable',
             '--batch_size', str(args.batch_size), '--amp', args.amp, '--device', str(device)]
    pargs, ctx = pretrain.parse_args(flags), training.Dist(0, 1, device)
    mae = pretrain.build_mae(pargs).to(device)
    if args.compile:  # as training.fit does
        mae.compile()
    groups = training.param_groups(mae.named_parameters(), pargs.weight_decay)
    pargs.lr = 1e-4  # any rate: the step's cost does not depend on it
    optimizer = training.build_optimizer(groups, pargs, ctx)  # AdamW as fit builds it
    scaler, loss_fn = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16'), pretrain.make_loss_fn(pargs)
    B, c = args.batch_size, mae.encoder.config
    batch = {'image': torch.randn(B, 3, *c.image_hw, device=device),
             'audio': torch.randn(B, 1, *c.audio_size, device=device), 'index': torch.arange(B, device=device),
             'noise_image': torch.rand(B, mae.encoder.image.num_patches, device=device),
             'noise_audio': torch.rand(B, mae.encoder.audio.num_patches, device=device)}
    log = training.Log(Path('unused'), ctx, 1)  # sums the logged values on the device; never writes here

    def step():
        training.train_step(pargs, ctx, mae, itertools.repeat(batch), loss_fn, 0, 0, scaler, log)
        training.optimizer_step(optimizer, scaler)
        log.reset()

    flops = step_flops(c, pargs.decoder_dim, pargs.decoder_depth, pargs.image_mask_ratio, pargs.audio_mask_ratio, B)
    return step, flops['step']


def encoder_step_fn(args, fusion, separable, mode, device):
    """A forward (or forward + backward) of the encoder alone, on all tokens or --masked. Returns (step, None)."""
    config = get_config(args.preset, fusion=fusion, separable=separable)
    model = DeepAVFusion(config).to(device).train(mode == 'fwd+bwd')
    if args.compile:
        model.compile()
    B, ctx = args.batch_size, training.Dist(0, 1, device)
    image = torch.randn(B, 3, *config.image_hw, device=device)
    audio = torch.randn(B, 1, *config.audio_size, device=device)
    # --masked: pre-training shapes, 25% of image and 20% of audio patches visible
    ids = ((torch.rand(B, model.image.num_patches, device=device).argsort(1)[:, :model.image.num_patches // 4],
            torch.rand(B, model.audio.num_patches, device=device).argsort(1)[:, :model.audio.num_patches // 5])
           if args.masked else None)

    def step():
        with training.autocast(args, ctx), torch.set_grad_enabled(mode == 'fwd+bwd'):
            out = model(image, audio, *(ids or ()))
            if mode == 'fwd+bwd':
                sum(o.float().pow(2).mean() for o in out).backward()
                model.zero_grad(set_to_none=True)

    return step, None


def measure(args, fusion, separable, mode):
    """Samples/s, peak memory (MiB) and, for 'train', TFLOP/s of one configuration; runs in its own process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device, base_rss = torch.device(args.device), current_rss_mb()
    step, flops = (train_step_fn(args, fusion, separable, device) if mode == 'train' else
                   encoder_step_fn(args, fusion, separable, mode, device))

    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda: None

    def timed():
        t = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t

    warm = [timed() for _ in range(args.warmup)]
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    sync()  # each timed step ends synchronized, so only the first needs it
    times = sorted(timed() for _ in range(args.steps))
    median = times[len(times) // 2]  # the median step: robust to a hiccup of a shared machine
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda' else
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)  # the growth of the peak RSS
    out = {'samples_per_s': args.batch_size / median, 'memory_mb': memory, 'first_step_s': warm[0] if warm else None}
    if flops:
        out['gflop_per_sample'], out['tflops'] = flops / args.batch_size / 1e9, flops / median / 1e12
        if args.peak_tflops:
            out['mfu'] = out['tflops'] / args.peak_tflops
    return out


def _worker(args, fusion, separable, mode):
    try:
        return measure(args, fusion, separable, mode)
    except Exception as e:  # e.g. out of memory: report it in the table rather than die
        return {'error': f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}


def run_isolated(args, fusion, separable, mode):
    """`measure` in a fresh spawned process, so peak memory is not inherited from an earlier row."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context('spawn')) as pool:
        return pool.submit(_worker, args, fusion, separable, mode).result()


def format_table(results, args):
    """A Markdown table like the paper's Table 5, with each row's time and memory relative to token fusion."""
    # The training step adds GFLOP per clip, TFLOP/s and (with a peak) MFU.
    head = (f"preset {args.preset}, batch {args.batch_size}, {args.device}, amp {args.amp}, "
            f"{'compiled' if args.compile else 'eager'}")
    head = ('pre-training step (masking, encoder, decoders, loss, backward, AdamW), ' + head if 'train' in args.modes
            else 'encoder, ' + head + (", masked as in pre-training" if args.masked else ", all tokens"))

    def columns(m):
        n = 'step' if m == 'train' else m
        cols = [f'{n} samples/s', f'{n} peak MiB', f'{n} time / token', f'{n} mem / token']
        if m == 'train':
            cols += ['GFLOP / clip', 'TFLOP/s'] + (['MFU'] if args.peak_tflops else [])
        return cols + ([f'{n} first step s'] if args.compile else [])

    cols = [col for m in args.modes for col in columns(m)]
    lines = [head, '', '| fusion | ' + ' | '.join(cols) + ' |', '|---' * (1 + len(cols)) + '|']
    for label in [row[0] for row in ROWS if row[0] in results]:
        cells = []
        for m in args.modes:
            r, ref = results[label].get(m, {}), results.get('token', {}).get(m, {})
            if 'error' in r:
                cells += [r['error']] + [''] * (len(columns(m)) - 1)
                continue
            rel = 'samples_per_s' in ref
            cells += [f"{r['samples_per_s']:.2f}", f"{r['memory_mb']:.0f}",
                      f"{ref['samples_per_s'] / r['samples_per_s']:.2f}x" if rel else '',
                      f"{r['memory_mb'] / ref['memory_mb']:.2f}x" if rel else '']
            if m == 'train':
                cells += [f"{r['gflop_per_sample']:.1f}", f"{r['tflops']:.3g}"]
                cells += [f"{100 * r['mfu']:.1f}%"] if args.peak_tflops else []
            cells += [f"{r['first_step_s']:.0f}"] if args.compile else []
        lines.append(f"| {label} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------- the loader

def make_inputs(folder, clips=20, seconds=10.0, videos=True):
    """Clips like those of docs/speed.md's loader table: `images.csv` (340 x 256 JPEG + 16 kHz mono WAV per clip)
    and, with `videos`, `videos.csv` (480 x 360 H.264 + 44.1 kHz stereo AAC, like VGGSound). Returns their paths."""
    import numpy as np
    import soundfile
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def picture(w, h, k):  # smooth colour gradients, stripes and noise: a JPEG about as costly as a photo
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(2 * np.pi * (f * x + g * y) + k) for f, g in rng.uniform(0.5, 8, (3, 2))], -1)
        return np.clip(128 + 70 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)

    def sound(rate, n, channels):
        t = np.arange(n) / rate
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.normal(size=n)
        return np.repeat(x[:, None], channels, 1).astype(np.float32)

    rows = []
    for k in range(clips):
        Image.fromarray(picture(340, 256, k)).save(folder / f'image{k:03d}.jpg', quality=90)
        soundfile.write(str(folder / f'audio{k:03d}.wav'), sound(16000, int(seconds * 16000), 1), 16000, 'PCM_16')
        rows.append(f'image{k:03d}.jpg,audio{k:03d}.wav')
    (folder / 'images.csv').write_text('image,audio\n' + '\n'.join(rows) + '\n')
    if not videos:
        return [folder / 'images.csv']
    from media import write_video
    fps, rate = 25, 44100
    for k in range(clips):
        still = picture(480, 360, k)  # a picture that moves: every frame differs from the key frame
        write_video(folder / f'video{k:03d}.mp4', (np.roll(still, 4 * i, axis=1) for i in range(int(seconds * fps))),
                    fps, sound(rate, int(seconds * rate), 2).T.copy(), rate,
                    options={'g': str(int(seconds * fps)), 'bf': '2'})
    (folder / 'videos.csv').write_text('video\n' + '\n'.join(f'video{k:03d}.mp4' for k in range(clips)) + '\n')
    return [folder / 'images.csv', folder / 'videos.csv']


def measure_loader(path, image_size, clips, batch=32, warmup=1, device_frontend=False):
    """Clips/s of one loader worker (one process, one thread) reading manifest `path` in training batches (the median
    batch), and its mean ms per clip in 'prepare', 'spectrogram' and 'collate'; a short manifest is read again."""
    import data
    torch.set_num_threads(1)
    ds = data.ManifestDataset(path, image_size, train=True, device_frontend=device_frontend)
    batches = max(clips // batch, 1)
    keys = [(1 + k // len(ds), k % len(ds)) for k in range((warmup + batches) * batch)]
    for w in range(warmup):
        data.collate(ds.__getitems__(keys[w * batch:(w + 1) * batch]))
    stages = {'prepare': lambda keys: [ds.prepare_key(k) for k in keys],  # these two: what __getitems__ does
              'spectrogram': ds.spectrograms, 'collate': data.collate}
    times, parts = [], dict.fromkeys(stages, 0.0)
    for w in range(warmup, warmup + batches):
        x, stamps = keys[w * batch:(w + 1) * batch], [time.perf_counter()]
        for name, fn in stages.items():
            x = fn(x)
            stamps.append(time.perf_counter())
            parts[name] += stamps[-1] - stamps[-2]
        times.append(stamps[-1] - stamps[0])
    n = batches * batch
    out = {'clips': n, 'batch': batch, 'clips_per_s': batch / sorted(times)[len(times) // 2],
           'mean_clips_per_s': n / sum(times), 'ms_per_clip': {k: 1e3 * v / n for k, v in parts.items()}}
    if 'video' in ds.rows[0]:
        out['extract_clips_per_s'] = measure_extraction([ds.resolve(r['video']) for r in ds.rows[:n]])
    return out


def measure_extraction(videos):
    """Videos/s of prepare/extract.py (its defaults) on one process: each video's audio and frames written to files."""
    from prepare.extract import cut
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, video in enumerate(videos):
            t = time.perf_counter()
            reason = cut({'video': video, 'fps': 1.0, 'short_side': 256, 'min_seconds': 1.0}, Path(tmp) / str(k))
            times.append(time.perf_counter() - t)
            if reason:
                raise ValueError(f"{video}: prepare/extract.py left it out ({reason})")
            shutil.rmtree(Path(tmp) / str(k))
    return 1 / sorted(times)[len(times) // 2]


def format_loader(results):
    """The loader's Markdown table: clips/s per worker core and milliseconds per clip in each part."""
    parts = list(next(iter(results.values()))['ms_per_clip'])
    lines = ['| manifest | clips/s per worker core | ' + ' | '.join(f'{s} ms' for s in parts)
             + ' | prepare/extract.py clips/s |', '|---' * (3 + len(parts)) + '|']
    for path, r in results.items():
        extract = f"{r['extract_clips_per_s']:.1f}" if 'extract_clips_per_s' in r else ''
        lines.append(f"| {path} | {r['clips_per_s']:.0f} | " + ' | '.join(f"{r['ms_per_clip'][s]:.2f}" for s in parts)
                     + f" | {extract} |")
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------- main

def get_parser():
    """The flags of bench.py."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='base', choices=['base', 'tiny'], help='model and recipe (default: base)')
    p.add_argument('--batch_size', type=int, default=None, help='clips per step (default: '
                   + ', '.join(f'{k} {v}' for k, v in BATCH.items()) + '; --loader: clips per batch, default 32)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='(default: cuda if any)')
    p.add_argument('--amp', default='none', choices=sorted(training.AMP_DTYPES), help='(default: none)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (default: off, eager)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per row, the median reported (default: 5)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per row (default: 2)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (default: 0, torch default)')
    p.add_argument('--train', action='store_true', help='time the whole pre-training step: --modes train and '
                   '--rows ' + ', '.join(TRAIN_ROWS) + ' unless given')
    p.add_argument('--rows', default=None, help='comma-separated subset of: ' + ', '.join(r[0] for r in ROWS)
                   + ' (default: all of them; with --train: ' + ', '.join(TRAIN_ROWS) + ')')
    p.add_argument('--modes', default=None,
                   help='comma-separated subset of: ' + ', '.join(MODES) + ' (default: fwd,fwd+bwd; --train: train)')
    p.add_argument('--masked', action='store_true', help='keep 25%% image / 20%% audio patches, as in pre-training')
    p.add_argument('--peak_tflops', type=float, default=0.0, help='peak TFLOP/s for MFU (default: under --amp '
                   'bf16/fp16 that of a known GPU: ' + ', '.join(k for k, _ in PEAK_TFLOPS) + '; needed for --train '
                   'on any other GPU)')
    p.add_argument('--json', default='', help='also write the results to this JSON file')
    p.add_argument('--loader', action='store_true', help='measure the data pipeline of --data instead of the model')
    p.add_argument('--data', nargs='+', default=[], help='--loader: manifests to read (each measured on its own)')
    p.add_argument('--image_size', type=int, default=224, help='--loader: crop size (default: 224)')
    p.add_argument('--clips', type=int, default=None,
                   help='--loader: clips timed per manifest (default: 10 batches); --make_inputs: clips (default: 20)')
    p.add_argument('--device_frontend', action='store_true', help="--loader: the worker's share under pretrain.py "
                   "--device_frontend (normalisation and spectrograms left to the device)")
    p.add_argument('--make_inputs', default='', metavar='DIR', help='write clips for --loader into DIR and stop')
    return p


def main(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    if args.make_inputs:
        for path in make_inputs(args.make_inputs, clips=args.clips or 20):
            print(f"wrote {path}")
        return None
    results = {}
    if args.loader:
        if not args.data:
            p.error('--loader needs --data: one or more manifests')
        batch = args.batch_size or 32
        for path in args.data:
            results[path] = r = measure_loader(path, args.image_size, args.clips or 10 * batch, batch,
                                               device_frontend=args.device_frontend)
            stages = ', '.join(f'{k} {v:.2f}' for k, v in r['ms_per_clip'].items())
            print(f"{path}: {r['clips_per_s']:.1f} clips/s per worker core (median; mean {r['mean_clips_per_s']:.1f})"
                  f" over {r['clips']} clips in batches of {batch}; ms per clip: {stages}"
                  + (f"; prepare/extract.py: {r['extract_clips_per_s']:.1f} clips/s" if 'extract_clips_per_s' in r
                     else ''), flush=True)
        table = format_loader(results)
    else:
        args.batch_size = args.batch_size or BATCH[args.preset]
        args.rows = (args.rows or ','.join(TRAIN_ROWS if args.train else [r[0] for r in ROWS])).split(',')
        args.modes = (args.modes or ('train' if args.train else 'fwd,fwd+bwd')).split(',')
        for name, values, allowed in (('--rows', args.rows, {r[0] for r in ROWS}), ('--modes', args.modes, set(MODES))):
            if not set(values) <= allowed:
                p.error(f"{name}: unknown {sorted(set(values) - allowed)}; choose from {sorted(allowed)}")
        args.peak_tflops = default_peak_tflops(args)
        if args.device.startswith('cuda') and 'train' in args.modes and not args.peak_tflops:
            p.error(f"MFU needs the GPU's peak: this one ({torch.cuda.get_device_name()}, amp {args.amp}) is not "
                    f"known; give --peak_tflops")
        for label, fusion, separable in [row for row in ROWS if row[0] in args.rows]:
            for mode in args.modes:
                results.setdefault(label, {})[mode] = r = run_isolated(args, fusion, separable, mode)
                print(f"{label:>22} {mode:>8}: {r}", flush=True)
        table = format_table(results, args)
    print('\n' + table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'results': results, 'table': table}, f, indent=2)
    return results


if __name__ == '__main__':
    main()
