"""The paper's ablations at CPU scale on AV-digits, one command that reruns them all and writes the tables and
plots into --out, of which results/avdigits/ holds a copy (Table 3: the compared systems of docs/systems.md;
Table 4: fusion depth and type; Table 5: time and memory; Table 7: pre-trained vs from scratch; Fig. 3: k-NN over
pre-training).

    python prepare/avdigits.py --src DIR --out data/avdigits     # --split speakers: results/avdigits/'s tables
    python ablations.py --data data/avdigits --out runs/ablations [--seeds 0,1,2]

Every row is pre-trained and evaluated once per seed, each run a separate `pretrain.py` / `finetune.py` process
(so its peak memory is its own), on the training split, scored on --split (val: what choices are made on; test:
to be looked at once, at the end). A finished run is kept: rerunning the command
skips it, so an interrupted sweep continues; --collect only gathers what finished. Results: OUT/ablations.md
(tables, mean +- standard deviation over seeds), OUT/knn_curves.png, OUT/results.json.
"""
import argparse
import json
import os
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
}
MAIN = 'early'  # the row Table 7 and Fig. 3 use

# The AV-digits recipe: the tiny preset with small decoders and a higher base lr (results/avdigits.md).
PRETRAIN = ['--preset', 'tiny', '--decoder_dim', '128', '--decoder_depth', '2', '--blr', '5e-3',
            '--warmup_epochs', '1', '--num_workers', '2', '--log_interval', '10']
TASKS = {  # downstream runs: task, manifest prefix, flags
    'linprobe': ('linprobe', 'class', []),  # the tiny recipe: 5 epochs, lr 1e-3, batch 32
    'localize': ('localize', 'localize', ['--lr', '1e-4', '--epochs', '10', '--speed_perturb', '0.2']),
    'separate': ('separate', 'separate', []),
    'retrieval': ('retrieval', 'class', []),  # no training: the --split clips, a clip's match is itself
}
METRICS = {'linprobe': ['top1'], 'localize': ['cIoU', 'pointing'], 'separate': ['SDR']}  # Table 7's columns
PROBES = ('linprobe', 'retrieval')  # run for every row


def run(cmd, out, log, collect=False):
    """Run a script in its own process unless OUT/run.json shows it finished; its wall time and peak memory (MiB).
    With `collect`, runs nothing: None if unfinished."""
    stamp = Path(out) / 'run.json'
    if stamp.exists():
        return json.loads(stamp.read_text())
    if collect:
        return None
    print('$', ' '.join(cmd), flush=True)
    t = time.time()
    with open(log, 'w') as f:
        proc = subprocess.Popen([sys.executable] + cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}; see {log}")
    result = {'seconds': time.time() - t, 'peak_mib': usage.ru_maxrss / 1024}
    stamp.write_text(json.dumps(result))
    return result


def pretrain(args, name, seed):
    """Pre-train row `name` with `seed`; returns its folder, time, memory and k-NN curve."""
    out = Path(args.out) / f"pre_{name}_s{seed}"
    if not args.collect:
        out.mkdir(parents=True, exist_ok=True)
    flags = [f'--{k}={v}' for k, v in ROWS[name][1].items()]
    cost = run(['pretrain.py', '--data', f'{args.data}/class_train.csv', *PRETRAIN, *flags, '--epochs',
                str(args.epochs), '--knn_every', str(args.knn_every), '--knn_data',
                f'{args.data}/class_{args.split}.csv', '--seed', str(seed), '--output_dir', str(out)], out,
               out / 'stdout.txt', args.collect)
    if cost is None:
        return None
    log = read_log(out / 'log.jsonl')
    speed, knn = np.median([r['clips_per_s'] for r in log if 'clips_per_s' in r]), [r for r in log if 'knn_image' in r]
    return {'dir': str(out), 'clips_per_s': float(speed), **cost, 'knn': knn}


def downstream(args, task, name, seed, init):
    """Run downstream `task` from checkpoint folder `init` (None: from scratch, row `name`'s shape)."""
    kind, prefix, flags = TASKS[task]
    out = Path(args.out) / f"{task}_{'scratch' if init is None else 'pre'}_{name}_s{seed}"
    if not args.collect:
        out.mkdir(parents=True, exist_ok=True)
    shape = ['--init', 'none', *(f'--{k}={v}' for k, v in ROWS[name][1].items())] if init is None else ['--init', init]
    data = ['--data', f'{args.data}/{prefix}_{args.split}.csv'] if kind == 'retrieval' else \
        ['--data', f'{args.data}/{prefix}_train.csv', '--val_data', f'{args.data}/{prefix}_{args.split}.csv']
    cost = run(['finetune.py', '--task', kind, '--preset', 'tiny', *shape, *data, *flags, '--seed', str(seed),
                '--output_dir', str(out)], out, out / 'stdout.txt', args.collect)
    return None if cost is None else json.loads((out / 'metrics.json').read_text())


def mean_sd(values, digits=3, seeds=3):
    """'mean +- sd' (sample deviation) of a list, with the number of seeds when fewer than `seeds`."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (1 seed)"
    text = f"{v.mean():.{digits}f} +- {v.std(ddof=1):.{digits}f}"
    return text + (f" ({len(v)} seeds)" if len(v) < seeds else '')


def tables(results, args):
    """The Markdown of OUT/ablations.md: Table 4 / 5 and Table 7."""
    seeds = ', '.join(map(str, args.seeds))
    ms = lambda values, digits=3: mean_sd(values, digits, len(args.seeds))  # noqa: E731
    lines = [f"AV-digits (split as prepare/avdigits.py --split made it), scored on {args.split}; seeds {seeds}; "
             f"mean +- standard deviation over seeds. Command: `python ablations.py --data DIR --out OUT --seeds "
             f"{','.join(map(str, args.seeds))} --epochs {args.epochs} --split {args.split}`.", '',
             '**Tables 3-5: systems, fusion depth and type** (retrieval among the scored clips, chance R@1 = 1 / '
             'clips; pre-training time per step and peak memory beside accuracy)', '',
             '| row | linear probe top-1 | 1-NN image | 1-NN audio | 1-NN fusion | 1-NN all | retrieval R@1 v2a / a2v '
             '| median rank v2a / a2v | pre-training clips/s | peak MiB |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for name in [n for n in ROWS if n in results['pre']]:
        runs = results['pre'][name]
        last = [r['knn'][-1] for r in runs if r['knn']]
        probe, ret = results['linprobe_pre'].get(name, []), results.get('retrieval_pre', {}).get(name, [])
        # No fusion feature without fusion tokens; CAV-MAE's and Audiovisual MAE's 'fusion' is their joint stream.
        unfused = ROWS[name][1].get('fusion') == 'none' or 'modalities' in ROWS[name][1]
        pair = lambda k, d=3: ' / '.join(  # noqa: E731  (both directions' cells of retrieval metric k)
            ms([r[f'{w}_{k}'] for r in ret], d) for w in ('v2a', 'a2v')) if ret else ''
        lines.append(f"| {ROWS[name][0]} | {ms([m['top1'] for m in probe]) if probe else ''} | "
                     + ' | '.join(ms([k[f'knn_{f}'] for k in last]) if last and f'knn_{f}' in last[0]
                                  and not (f == 'fusion' and unfused) else '-'
                                  for f in ('image', 'audio', 'fusion', 'all'))
                     + f" | {pair('R@1')} | {pair('MR', 1)} | {ms([r['clips_per_s'] for r in runs], 1)} | "
                     f"{ms([r['peak_mib'] for r in runs], 0)} |")
    lines += ['', f'**Table 7: pre-trained vs from scratch** ({ROWS[MAIN][0]})', '',
              '| task | metric | pre-trained | from scratch |', '| --- | --- | --- | --- |']
    for task in [t for t in args.tasks if t in METRICS]:
        pre, scratch = results[f'{task}_pre'].get(MAIN, []), results[f'{task}_scratch'].get(MAIN, [])
        for m in METRICS[task]:
            cells = [ms([r[m] for r in runs if m in r]) if any(m in r for r in runs) else '' for runs in (pre, scratch)]
            if any(cells):
                lines.append(f"| {task} | {m} | {cells[0]} | {cells[1]} |")
    return '\n'.join(lines) + '\n'


def get_parser():
    """The flags of the sweep."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help="prepare/avdigits.py's output folder")
    p.add_argument('--out', default='runs/ablations', help='(default: runs/ablations)')
    p.add_argument('--seeds', default='0,1,2', help="(default: 0,1,2)")
    p.add_argument('--epochs', type=int, default=10, help='pre-training epochs per row (default: 10)')
    p.add_argument('--knn_every', type=int, default=2, help='epochs between k-NN measurements (default: 2)')
    p.add_argument('--split', default='val', choices=['val', 'test'], help="scored on (default: val)")
    p.add_argument('--rows', default=','.join(ROWS), help=f"rows of Table 4 (default: all: {','.join(ROWS)})")
    p.add_argument('--tasks', default='linprobe,retrieval,localize,separate',
                   help='linprobe, retrieval: every row; localize, separate: Table 7, the main row pre-trained and '
                        'from scratch (default: all four)')
    p.add_argument('--report', action='store_true', help='only rewrite the tables and plot from OUT/results.json')
    p.add_argument('--collect', action='store_true', help='run nothing: the tables and plot from the runs in OUT '
                                                          'that finished (interrupted, or side by side)')
    return p


def main(argv=None):
    """Run (or gather) the sweep, writing OUT/results.json, OUT/ablations.md and OUT/knn_curves.png."""
    p = get_parser()
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(',')]
    if set(args.rows.split(',')) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(args.rows.split(',')) - set(ROWS))}; choose from {list(ROWS)}")
    args.rows = [r for r in ROWS if r in args.rows.split(',')]
    args.tasks = [t for t in args.tasks.split(',') if t]
    if set(args.tasks) - set(TASKS):
        p.error(f"--tasks: unknown {sorted(set(args.tasks) - set(TASKS))}; choose from {sorted(TASKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {'pre': {}, **{f'{t}_{k}': {} for t in TASKS for k in ('pre', 'scratch')}}
    probes = [t for t in PROBES if t in args.tasks]

    def save():
        (out / 'results.json').write_text(json.dumps(results, indent=1))
        (out / 'ablations.md').write_text(tables(results, args))
        plot_knn(results, out / 'knn_curves.png')

    if args.report:
        results = json.loads((out / 'results.json').read_text())
        save()
        print(tables(results, args))
        return results

    # In the order that leaves the most complete tables if stopped early: the main row and the probe from
    # scratch over every seed (Table 7's first line, Fig. 3), then per seed the other rows and tasks.
    def add(table, name, result):  # --collect leaves out what has not finished
        if result is not None:
            results[table].setdefault(name, []).append(result)
        return result

    pre = {}
    for seed in args.seeds if MAIN in args.rows else []:
        pre[seed] = add('pre', MAIN, pretrain(args, MAIN, seed))
        for kind, init in (('pre', pre[seed] and pre[seed]['dir']), ('scratch', None)):
            if init or kind == 'scratch':
                add(f'linprobe_{kind}', MAIN, downstream(args, 'linprobe', MAIN, seed, init))
        if pre[seed] and 'retrieval' in probes:
            add('retrieval_pre', MAIN, downstream(args, 'retrieval', MAIN, seed, pre[seed]['dir']))
        save()
    for seed in args.seeds:
        for task in [t for t in args.tasks if t not in PROBES and MAIN in args.rows]:
            for kind, init in (('pre', pre[seed] and pre[seed]['dir']), ('scratch', None)):
                if init or kind == 'scratch':
                    add(f'{task}_{kind}', MAIN, downstream(args, task, MAIN, seed, init))
            save()
        for name in [r for r in args.rows if r != MAIN]:
            if row := add('pre', name, pretrain(args, name, seed)):
                for task in probes:
                    add(f'{task}_pre', name, downstream(args, task, name, seed, row['dir']))
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
