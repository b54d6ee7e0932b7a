"""Speed and memory of the DeepAVFusion encoder per fusion type: the paper's Table 5, measured here.

    python bench.py --preset base --batch_size 4 --device cpu
    python bench.py --preset base --batch_size 32 --device cuda --amp bf16 --json bench.json
    python bench.py --loader --data prepared/train.csv videos.csv --image_size 224


Each row (fusion type and form) and mode (forward only, forward + backward) runs in a fresh process, so peak
memory is that row's alone: on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of the process's peak
resident set over what it held before the model was built (weights, activations and allocator slack).

--loader measures the data pipeline alone, as one loader worker runs it: clips/s of `ManifestDataset` items
(decode, resample, spectrogram, crop, flip; training transforms) in one process on one core, for each manifest
given (prepared frames + audio files, or videos decoded on the fly).
"""
import argparse
import json
import multiprocessing as mp
import resource
import time

import torch

from model import DeepAVFusion, get_config

ROWS = [  # (label, fusion, separable)
    ('none', 'none', True),
    ('token', 'token', True),
    ('dense literal', 'dense', False),
    ('dense separable', 'dense', True),
    ('factorized literal', 'factorized', False),
    ('factorized separable', 'factorized', True),
]
MODES = ('fwd', 'fwd+bwd')


def current_rss_mb():
    """Resident set size of this process now, in MiB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args, fusion, separable, mode):
    """Samples/s and peak memory (MiB) of one configuration; runs in its own process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    base_rss = current_rss_mb()
    config = get_config(args.preset, fusion=fusion, separable=separable)
    model = DeepAVFusion(config).to(device).train(mode == 'fwd+bwd')
    B = args.batch_size
    image = torch.randn(B, 3, *config.image_hw, device=device)
    audio = torch.randn(B, 1, *config.audio_size, device=device)
    ids = None
    if args.masked:  # pre-training shapes: 25% of image and 20% of audio patches visible
        ids = (torch.rand(B, model.image.num_patches, device=device).argsort(1)[:, :model.image.num_patches // 4],
               torch.rand(B, model.audio.num_patches, device=device).argsort(1)[:, :model.audio.num_patches // 5])
    amp = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            with torch.set_grad_enabled(mode == 'fwd+bwd'):
                out = model(image, audio, *(ids or ()))
                if mode == 'fwd+bwd':
                    sum(o.float().pow(2).mean() for o in out).backward()
        if mode == 'fwd+bwd':
            model.zero_grad(set_to_none=True)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):  # the median step: robust to a hiccup of a shared machine
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    if device.type == 'cuda':
        memory = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {'samples_per_s': B / median, 'memory_mb': memory}


def _worker(args, fusion, separable, mode, queue):
    try:
        queue.put(measure(args, fusion, separable, mode))
    except Exception as e:  # e.g. out of memory: report it in the table rather than die
        queue.put({'error': f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})


def run_isolated(args, fusion, separable, mode):
    """`measure` in a fresh spawned process, so peak memory is not inherited from an earlier row."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(args, fusion, separable, mode, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def format_table(results, args):
    """A Markdown table like the paper's Table 5, with each row's time and memory relative to token fusion."""
    head = f"encoder, preset {args.preset}, batch {args.batch_size}, {args.device}, amp {args.amp}" + \
           (", masked as in pre-training" if args.masked else ", all tokens")
    lines = [head, '',
             '| fusion | ' + ' | '.join(f'{m} samples/s | {m} peak MiB | {m} time / token | {m} mem / token'
                                          for m in args.modes) + ' |',
             '|---' * (1 + 4 * len(args.modes)) + '|']
    for label, _, _ in ROWS:
        if label not in results:
            continue
        cells = []
        for m in args.modes:
            r, ref = results[label].get(m, {}), results.get('token', {}).get(m, {})
            if 'error' in r:
                cells += [r['error'], '', '', '']
                continue
            cells += [f"{r['samples_per_s']:.2f}", f"{r['memory_mb']:.0f}"]
            if 'samples_per_s' in ref:
                cells += [f"{ref['samples_per_s'] / r['samples_per_s']:.2f}x",
                          f"{r['memory_mb'] / ref['memory_mb']:.2f}x"]
            else:
                cells += ['', '']
        lines.append(f"| {label} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def measure_loader(path, image_size, clips, warmup=4):
    """Clips/s of one loader worker (one process, one torch thread) reading manifest `path` with the training
    transforms: the median over `clips` items of the time per item, after `warmup` untimed ones."""
    from data import ManifestDataset
    torch.set_num_threads(1)
    ds = ManifestDataset(path, image_size, train=True)
    n = min(clips, len(ds))
    for i in range(min(warmup, n)):
        ds[i]
    times = []
    for i in range(n):
        t = time.perf_counter()
        ds[i % len(ds)]
        times.append(time.perf_counter() - t)
    times.sort()
    return {'clips': n, 'clips_per_s': 1 / times[len(times) // 2], 'mean_clips_per_s': n / sum(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='base', choices=['base', 'tiny'])
    p.add_argument('--batch_size', type=int, default=4)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    p.add_argument('--steps', type=int, default=5, help='timed steps per row (the median is reported)')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per row')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    p.add_argument('--rows', default=','.join(r[0] for r in ROWS),
                   help='comma-separated subset of: ' + ', '.join(r[0] for r in ROWS))
    p.add_argument('--modes', default=','.join(MODES), help='comma-separated subset of: ' + ', '.join(MODES))
    p.add_argument('--masked', action='store_true', help='keep 25%% image / 20%% audio patches, as in pre-training')
    p.add_argument('--json', default='', help='also write the results to this JSON file')
    p.add_argument('--loader', action='store_true', help='measure the data pipeline of --data instead of the model')
    p.add_argument('--data', nargs='+', default=[], help='--loader: manifests to read (each measured on its own)')
    p.add_argument('--image_size', type=int, default=224, help='--loader: crop size (default: 224)')
    p.add_argument('--clips', type=int, default=100, help='--loader: clips timed per manifest (default: 100)')
    args = p.parse_args(argv)
    if args.loader:
        if not args.data:
            p.error('--loader needs --data: one or more manifests')
        results = {}
        for path in args.data:
            results[path] = measure_loader(path, args.image_size, args.clips)
            print(f"{path}: {results[path]['clips_per_s']:.1f} clips/s per worker core (median; mean "
                  f"{results[path]['mean_clips_per_s']:.1f}) over {results[path]['clips']} clips", flush=True)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'args': vars(args), 'results': results}, f, indent=2)
        return results
    args.rows, args.modes = args.rows.split(','), args.modes.split(',')
    known = {r[0] for r in ROWS}
    for name, values, allowed in (('--rows', args.rows, known), ('--modes', args.modes, set(MODES))):
        if not set(values) <= allowed:
            p.error(f"{name}: unknown {sorted(set(values) - allowed)}; choose from {sorted(allowed)}")

    results = {}
    for label, fusion, separable in ROWS:
        if label not in args.rows:
            continue
        results[label] = {}
        for mode in args.modes:
            results[label][mode] = run_isolated(args, fusion, separable, mode)
            print(f"{label:>22} {mode:>8}: {results[label][mode]}", flush=True)
    table = format_table(results, args)
    print('\n' + table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'results': results, 'table': table}, f, indent=2)
    return results


if __name__ == '__main__':
    main()
