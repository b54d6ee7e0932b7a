"""The paper's comparison at CPU scale on AV-digits, one command that reruns it and writes the tables and plots
into --out, of which results/ holds copies: every system as a row (Table 3: the compared systems of docs/systems.md;
Table 4: fusion depth and type; Table 7: an untrained encoder; LAVISH's adapters on the frozen encoder), every
downstream task as a column, with time and memory (Table 5) and k-NN over pre-training (Fig. 3).

    python prepare/avdigits.py --src DIR --out data/takes     # FSDD's split; --split speakers --out data/speakers
    python ablations.py --data data/takes --out runs/ablations_takes --split test [--seeds 0,1,2]
    python prepare/avdigits.py --src DIR --out data/avdk_se3 --tasks localize --speak_each --pairings 3
    python ablations.py ... --tasks localize --localize_data data/avdk_se3   # the canvases localization learns on

Every row is pre-trained and evaluated once per seed, each run a separate `pretrain.py` / `finetune.py` process
(so its peak memory is its own), on the training split, scored on --split (val: what choices are made on; test:
to be looked at once, at the end). A finished run is kept: rerunning the command
skips it, and the run a stopped sweep was in continues from its last checkpoint (--resume auto), so an interrupted
sweep continues where it stopped; --collect only gathers what finished. Results: OUT/ablations.md
(tables, mean +- standard deviation over seeds, differences from row 'early' paired by seed), OUT/knn_curves.png,
OUT/results.json; with --archive DIR, what --collect reads of every finished run, for results/ (see --help).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from plots import line_plot
from training import read_log

# Table 4's rows at the tiny preset's depth 4: early = every layer, mid = the last third (rounded up: 2 of 4
# layers, as 8-11 of 12 in the paper), late = the last layer, none = no fusion blocks. Token and dense fusion at
# every layer beside factorized, the paper's choice.
ROWS = {  # key: (what the table calls it, encoder flags)
    'early': ('factorized, every layer (early)', dict(fusion='factorized', fusion_layers='all')),
    'mid': ('factorized, layers 2-3 (mid: the last third)', dict(fusion='factorized', fusion_layers='2-3')),
    'late': ('factorized, layer 3 (late: the last layer)', dict(fusion='factorized', fusion_layers='3')),
    'none': ('no fusion', dict(fusion='none', fusion_layers='none')),
    'token': ('token, every layer', dict(fusion='token', fusion_layers='all')),
    'dense': ('dense, every layer', dict(fusion='dense', fusion_layers='all')),
    # The compared pre-training systems (docs/systems.md), same budget: Table 3's rows and an ablation.
    'contrast': ('DeepAVFusion + contrastive term, lambda 0.01', dict(contrast_weight=0.01)),
    'cavmae': ('CAV-MAE (lambda_c 0.01)', dict(system='cavmae')),
    'cavmae_mae': ("CAV-MAE without its term (its 'AV-MAE')", dict(system='cavmae', contrast_weight=0)),
    'avmae': ('Audiovisual MAE (mid-fusion S = 2, shared decoder)', dict(system='avmae')),
    'mae_image': ('uni-modal MAE, image', dict(modalities='image')),
    'mae_audio': ('uni-modal MAE (AudioMAE-style), audio', dict(modalities='audio')),
    # Not pre-trained: row early's encoder untrained (Table 7's "from scratch"), and LAVISH's adapters on row
    # early's frozen pre-trained encoder (its frozen-encoder columns are row early's).
    'untrained': ('untrained encoder (no pre-training)', None),
    'lavish': ("LAVISH adapters on row early's frozen encoder", None),
}
MAIN = 'early'  # the row the untrained and LAVISH rows, the paired differences and Fig. 3 use
KIND = {'untrained': 'scratch', 'lavish': 'lavish'}  # results[f'{task}_{kind}'][MAIN]; other rows: 'pre'

# The AV-digits recipe: the tiny preset with small decoders and a higher base lr (results/avdigits.md).
PRETRAIN = ['--preset', 'tiny', '--decoder_dim', '128', '--decoder_depth', '2', '--blr', '5e-3',
            '--warmup_epochs', '1', '--num_workers', '2', '--log_interval', '10']
TASKS = {  # downstream runs: task, manifest prefix, flags (the tiny recipe: 5 epochs, lr 1e-3, batch 32)
    'linprobe': ('linprobe', 'class', []),
    'finetune': ('finetune', 'class', []),
    'knn': ('knn', 'class', []),  # no training: 1-NN leave-one-out among the --split clips
    'retrieval': ('retrieval', 'class', []),  # no training: the --split clips, a clip's match is itself
    # The recipe that learns within issue 22's budget (results/avdigits.md): lr 3e-4, batch 16, 4 epochs, no crops
    # or flips (a flipped digit is another glyph), the first 1 s of the audio; its canvases from --localize_data
    'localize': ('localize', 'localize', ['--lr', '3e-4', '--epochs', '4', '--speed_perturb', '0.2',
                                          '--no_train_augment', '--batch_size', '16', '--audio_seconds', '1']),
    'separate': ('separate', 'separate', []),
}
FROZEN = ('linprobe', 'knn', 'retrieval')  # read the encoder as it is: LAVISH's row has none of its own
COLUMNS = [  # (header, task, metric key, digits)
    ('linear probe top-1', 'linprobe', 'top1', 3), ('fine-tuning top-1', 'finetune', 'top1', 3),
    *((f'1-NN {f}', 'knn', f'nn_{f}', 3) for f in ('image', 'audio', 'fusion', 'all')),
    ('retrieval R@1 v2a', 'retrieval', 'v2a_R@1', 3), ('retrieval R@1 a2v', 'retrieval', 'a2v_R@1', 3),
    ('median rank v2a', 'retrieval', 'v2a_MR', 1), ('median rank a2v', 'retrieval', 'a2v_MR', 1),
    ('localization pointing', 'localize', 'pointing', 3), ('localization cIoU (0.5)', 'localize', 'cIoU', 3),
    ('separation SDR (dB)', 'separate', 'SDR', 2), ('separation SDRi (dB)', 'separate', 'SDRi', 2),
    ('fine-tuning trainable (M)', 'finetune', 'trainable_M', 2), ('fine-tuning clips/s', 'finetune', 'clips_per_s', 1),
    ('pre-training clips/s', 'pre', 'clips_per_s', 1), ('pre-training peak MiB', 'pre', 'peak_mib', 0)]
PAIRED = [c for c in COLUMNS if c[2] in ('top1', 'nn_image', 'pointing', 'SDR')]  # the paired differences' columns


def portable(cmd, args):
    """The command as run.json records it, --out, --data and --localize_data written {out}, {data} and
    {localize_data}: archived runs are recognised wherever they are put."""
    paths = [(str(args.out), '{out}'), (str(args.data), '{data}'), (str(args.localize_data), '{localize_data}')]
    for path, name in sorted([p for p in paths if p[0]], key=lambda p: -len(p[0])):
        cmd = [a.replace(path, name) for a in cmd]
    return cmd


def run(cmd, out, log, args):
    """Run a script in its own process unless OUT/run.json shows it finished; its wall time and peak memory (MiB)
    (of the last process, where a run was resumed)."""
    # With --collect nothing runs (None if unfinished); a finished run of another command is refused.
    stamp, recorded = Path(out) / 'run.json', portable(cmd, args)
    if stamp.exists():
        if (done := json.loads(stamp.read_text())).get('cmd', recorded) != recorded:
            raise SystemExit(f"{out} finished another command ({' '.join(done['cmd'])}): give another --out")
        return done
    if args.collect:
        return None
    # A run a stopped sweep left unfinished continues from its last checkpoint (--resume auto: the same run, as
    # training.py resumes it), its output after the interrupted part's; without a checkpoint it starts anew. A
    # resumed run keeps its own flags, so one started by another command is refused rather than recorded as this.
    began = Path(out) / 'started.json'
    other = json.loads(began.read_text()) if began.exists() else recorded
    if (Path(out) / 'checkpoint.pt').exists() and other != recorded:
        raise SystemExit(f"{out} holds an unfinished run of another command ({' '.join(other)}): give another --out, "
                         "or move it away")
    print('$', ' '.join(cmd), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    began.write_text(json.dumps(recorded))
    t = time.time()
    with open(log, 'a') as f:
        proc = subprocess.Popen([sys.executable, *cmd, '--resume', 'auto'], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}; see {log}")
    result = {'seconds': time.time() - t, 'peak_mib': usage.ru_maxrss / 1024, 'cmd': recorded}
    stamp.write_text(json.dumps(result))
    return result


def archive(out, dest):
    """Copy what --collect reads of sweep folder `out`'s finished runs (kilobytes, no checkpoints) into `dest`. A run
    already there keeps its first record: a pre-training run again for a later column logs the same losses, not
    the same clips/s."""
    for run_dir in (s.parent for s in Path(out).glob('*/run.json')):
        kept = dest / run_dir.name
        if (kept / 'run.json').exists():
            continue
        kept.mkdir(parents=True, exist_ok=True)
        for name in ('metrics.json', 'log.jsonl', 'run.json'):  # run.json last: it marks the copy finished
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, kept / name)


def log_speed(folder):
    """The median clips/s of a run's log.jsonl (None without one)."""
    path = Path(folder) / 'log.jsonl'
    speeds = [r['clips_per_s'] for r in read_log(path) if 'clips_per_s' in r] if path.exists() else []
    return float(np.median(speeds)) if speeds else None


def pretrain(args, name, seed):
    """Pre-train row `name` with `seed`; returns its folder, time, memory and k-NN curve."""
    out = Path(args.out) / f"pre_{name}_s{seed}"
    # An archived sweep keeps no checkpoints: a pre-training that a downstream run still to do reads runs again
    # (the same command and seed).
    todo = [Path(args.out) / f"{t}_{k}_{name}_s{seed}" for t in args.tasks for k in ('pre', 'lavish')
            if k == 'pre' or name == MAIN and 'lavish' in args.rows and t not in FROZEN]
    if not args.collect and not (out / 'checkpoint.pt').exists() and any(not (d / 'run.json').exists() for d in todo):
        (out / 'run.json').unlink(missing_ok=True)
    flags = [f'--{k}={v}' for k, v in ROWS[name][1].items()]
    cost = run(['pretrain.py', '--data', f'{args.data}/class_train.csv', *PRETRAIN, *flags, '--epochs',
                str(args.epochs), '--knn_every', str(args.knn_every), '--knn_data',
                f'{args.data}/class_{args.split}.csv', '--seed', str(seed), '--output_dir', str(out)], out,
               out / 'stdout.txt', args)
    if cost is None:
        return None
    knn = [r for r in read_log(out / 'log.jsonl') if 'knn_image' in r]
    return {'dir': str(out), 'clips_per_s': log_speed(out), **cost, 'knn': knn}


def downstream(args, task, name, seed, init, kind='pre'):
    """Run downstream `task` from checkpoint folder `init` (kind 'pre'), row `name`'s shape untrained ('scratch')
    or with LAVISH's adapters on `init` ('lavish'); its metrics, with the run's memory and clips/s."""
    script, prefix, flags = TASKS[task]
    out = Path(args.out) / f"{task}_{kind}_{name}_s{seed}"
    shape = ['--init', 'none', *(f'--{k}={v}' for k, v in ROWS[name][1].items())] if kind == 'scratch' else \
        ['--init', init, *(['--adapter', 'lavish'] if kind == 'lavish' else [])]
    src = task == 'localize' and args.localize_data or args.data
    data = ['--data', f'{src}/{prefix}_{args.split}.csv'] if task == 'retrieval' else \
        ['--data', f'{src}/{prefix}_train.csv', '--val_data', f'{src}/{prefix}_{args.split}.csv']
    cost = run(['finetune.py', '--task', script, '--preset', 'tiny', *shape, *data, *flags, '--seed', str(seed),
                '--output_dir', str(out)], out, out / 'stdout.txt', args)
    if cost is None:
        return None
    metrics = json.loads((out / 'metrics.json').read_text())
    return {**metrics, 'peak_mib': cost['peak_mib'], 'clips_per_s': log_speed(out),
            **({'trainable_M': metrics['trainable'] / 1e6} if 'trainable' in metrics else {})}


def mean_sd(values, digits=3, seeds=3):
    """'mean +- sd' (sample deviation) of a list, with the number of seeds when fewer than `seeds`."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    text = f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f}"
    return text + (f" ({len(v)} seeds)" if len(v) < seeds else '')


def row_values(results, name, task, key):
    """{seed: value} of row `name`'s runs of `task` ('pre': its pre-training) that report `key`."""
    runs = results['pre'].get(name, []) if task == 'pre' else \
        results.get(f'{task}_{KIND.get(name, "pre")}', {}).get(MAIN if name in KIND else name, [])
    if task == 'knn' and not runs and name not in KIND:  # before the knn column: the last k-NN of pre-training
        runs = [{**r['knn'][-1], 'seed': r.get('seed', i)} for i, r in enumerate(results['pre'].get(name, []))
                if r['knn']]
        key = key.replace('nn_', 'knn_')
    return {r.get('seed', i): r[key] for i, r in enumerate(runs) if r.get(key) is not None}


def tables(results, args):
    """The Markdown of OUT/ablations.md: every row's columns, and the paired differences from row MAIN."""
    ms = lambda values, digits=3: mean_sd(values, digits, len(args.seeds))  # noqa: E731
    lines = [f"AV-digits (split as prepare/avdigits.py --split made it), scored on {args.split}; seeds "
             f"{', '.join(map(str, args.seeds))}; mean +- standard deviation over seeds. Command: `python ablations.py "
             f"--data DIR{' --localize_data DIR2' * bool(args.localize_data)} --out OUT --seeds "
             f"{','.join(map(str, args.seeds))} --epochs {args.epochs} --split {args.split}`. Retrieval among the "
             f"scored clips (chance R@1 = 1 / clips); CAV-MAE's and Audiovisual MAE's fusion feature is their joint "
             f"stream; '-': not this row's (no fusion tokens, no pre-training; LAVISH's frozen encoder is row "
             f"{MAIN}'s); blank: not run.", '',
             '| row | ' + ' | '.join(c[0] for c in COLUMNS) + ' |', '| --- ' * (len(COLUMNS) + 1) + '|']
    shown = [n for n in ROWS if any(row_values(results, n, t, k) for _, t, k, _ in COLUMNS)]
    for name in shown:
        unfused = (ROWS[name][1] or {}).get('fusion') == 'none' or 'modalities' in (ROWS[name][1] or {})
        cells = []
        for _, task, key, digits in COLUMNS:
            values = list(row_values(results, name, task, key).values())
            na = name in KIND and task == 'pre' or name == 'lavish' and task in FROZEN or key == 'nn_fusion' and unfused
            cells.append('-' if na else ms(values, digits) if values else '')
        lines.append(f"| {ROWS[name][0]} | " + ' | '.join(cells) + ' |')
    lines += ['', f"**Paired differences from row {MAIN}** (this row minus row {MAIN}, seed by seed, mean +- sd over "
              "the seeds both have)", '', '| row | ' + ' | '.join(c[0] for c in PAIRED) + ' |',
              '| --- ' * (len(PAIRED) + 1) + '|']
    for name in [n for n in shown if n != MAIN]:
        cells = []
        for _, task, metric, digits in PAIRED:
            mine, main = row_values(results, name, task, metric), row_values(results, MAIN, task, metric)
            diffs = [mine[s] - main[s] for s in mine if s in main]
            cells.append('-' if name == 'lavish' and task in FROZEN else ms(diffs, digits) if diffs else '')
        lines.append(f"| {ROWS[name][0]} | " + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def get_parser():
    """The flags of the sweep."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help="prepare/avdigits.py's output folder")
    p.add_argument('--out', default='runs/ablations', help='(default: runs/ablations)')
    p.add_argument('--seeds', default='0,1,2', help="(default: 0,1,2)")
    p.add_argument('--epochs', type=int, default=10, help='pre-training epochs per row (default: 10)')
    p.add_argument('--localize_data', default='', help="the localization manifests' folder (default: --data)")
    p.add_argument('--knn_every', type=int, default=2, help='epochs between k-NN measurements (default: 2)')
    p.add_argument('--split', default='val', choices=['val', 'test'], help="scored on (default: val)")
    p.add_argument('--rows', default=','.join(ROWS), help=f"the rows (default: all: {','.join(ROWS)})")
    p.add_argument('--tasks', default=','.join(TASKS), help=f"the downstream tasks of every row (default: all: "
                                                             f"{','.join(TASKS)})")
    p.add_argument('--report', action='store_true', help='only rewrite the tables and plot from OUT/results.json')
    p.add_argument('--collect', action='store_true', help='run nothing: the tables and plot from the runs in OUT '
                                                          'that finished (interrupted, or side by side)')
    p.add_argument('--archive', default='', help="also copy each finished run's run.json, metrics.json and log.jsonl "
                   "into this folder, unless a record of that run is there already (a sweep without checkpoints, for "
                   "results/: --collect reads it as OUT, and copied into OUT a sweep continues from it; default: none)")
    return p


def main(argv=None):
    """Run (or gather) the sweep, writing OUT/results.json, OUT/ablations.md and OUT/knn_curves.png."""
    p = get_parser()
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(',')]
    if set(args.rows.split(',')) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(args.rows.split(',')) - set(ROWS))}; choose from {list(ROWS)}")
    args.rows = [r for r in ROWS if r in args.rows.split(',')]
    if 'lavish' in args.rows and MAIN not in args.rows:
        p.error(f"--rows lavish adapts row {MAIN}'s pre-trained encoder: give {MAIN} too")
    args.tasks = [t for t in args.tasks.split(',') if t]
    if set(args.tasks) - set(TASKS):
        p.error(f"--tasks: unknown {sorted(set(args.tasks) - set(TASKS))}; choose from {sorted(TASKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {'pre': {}, **{f'{t}_{k}': {} for t in TASKS for k in ('pre', 'scratch', 'lavish')}}

    def save():
        if args.archive:
            archive(out, Path(args.archive))
        (out / 'results.json').write_text(json.dumps(results, indent=1))
        (out / 'ablations.md').write_text(tables(results, args))
        plot_knn(results, out / 'knn_curves.png')

    if args.report:
        results = json.loads((out / 'results.json').read_text())
        save()
        print(tables(results, args))
        return results

    def add(table, name, result, seed):  # --collect leaves out what has not finished
        if result is not None:
            results.setdefault(table, {}).setdefault(name, []).append({**result, 'seed': seed})
        return result

    # Seed by seed, so that a stopped sweep leaves whole rows; row MAIN first (the LAVISH row reads its encoder).
    for seed in args.seeds:
        main_dir = None
        for name in sorted(args.rows, key=lambda n: (n != MAIN, n == 'lavish')):
            if name == 'untrained':
                for task in args.tasks:
                    add(f'{task}_scratch', MAIN, downstream(args, task, MAIN, seed, None, 'scratch'), seed)
            elif name == 'lavish':
                main_dir = main_dir or (pretrain(args, MAIN, seed) or {}).get('dir')
                for task in [t for t in args.tasks if t not in FROZEN and main_dir]:
                    add(f'{task}_lavish', MAIN, downstream(args, task, MAIN, seed, main_dir, 'lavish'), seed)
            elif row := add('pre', name, pretrain(args, name, seed), seed):
                main_dir = row['dir'] if name == MAIN else main_dir
                for task in args.tasks:
                    add(f'{task}_pre', name, downstream(args, task, name, seed, row['dir']), seed)
            save()
    print(tables(results, args))
    return results


def plot_knn(results, path):
    """Fig. 3: 1-NN accuracy of image, audio and fusion features over pre-training (main row, mean over seeds)."""
    runs = [r['knn'] for r in results['pre'].get(MAIN, []) if r['knn']]
    if not runs:
        return
    n = min(len(r) for r in runs)
    epochs = [row['epoch'] for row in runs[0][:n]]
    feats = [f for f in ('image', 'audio', 'fusion', 'all') if f'knn_{f}' in runs[0][0]]
    values = {f: np.array([[r[i][f'knn_{f}'] for i in range(n)] for r in runs]) for f in feats}
    line_plot({f: (epochs, v.mean(0)) for f, v in values.items()}, path,
              f"1-NN over pre-training, row '{MAIN}' (mean and spread of {len(runs)} seeds)",
              'pre-training epoch', '1-NN accuracy, leave-one-out on held-out clips',
              errors={f: v.std(0) for f, v in values.items()})


if __name__ == '__main__':
    main()
