"""Prepare AV-digits: handwritten digits (MNIST) paired with the same digits spoken aloud (Free Spoken Digit).

    python prepare/avdigits.py --src DIR --out OUT [--tasks class,localize,separate] [--workers N]

The closest thing to a real audio-visual benchmark that fits on a small CPU: real recordings and real
handwriting, where picture and sound show the same thing. --src holds mnist/images-idx3-ubyte.gz,
mnist/labels-idx1-ubyte.gz (IDX files) and fsdd/{digit}_{speaker}_{take}.wav; without --src the public sources
are downloaded into OUT/sources (MNIST's test set, 10,000 digits; FSDD, 3,000 recordings of 6 speakers).

Two protocols (--split), the MNIST pictures cut --picture_split ways in index order under both, so that no
handwritten digit and no recording is in two splits:
    takes      (default) FSDD's own split: takes 0-4 of every voice are the test set (--test_takes), as FSDD's
               README holds them out; --val_takes (5-9) of every voice validate, for choosing; the rest train
    speakers   by voice: --test_speakers and --val_speakers are held out, the rest train (the harder question of
               an unseen voice); --val_takes also holds out some takes of the training speakers
Three tasks, each with a manifest per split (OUT/<task>_<split>.csv, a `key` column naming each clip):

    class      a picture of a digit with a recording of the same digit (label: the digit), for linprobe,
               finetune, knn, and pre-training
    localize   2 to 4 different digits on a 2 x 2 canvas, one of them spoken: `mask` is the spoken digit's cell
               (value digit + 1, so --task segment --seg_classes 10 reads it as semantic segmentation)
    separate   as class, plus OUT/separate_<split>_pairs.csv for the held-out splits: pairs of clips of
               different digits (source_1,source_2,class_1,class_2), the mixtures to score

Every recording becomes --pairings clips, each with a different picture (and with --speak_each each training canvas
is spoken once per digit on it). Recordings that cannot be read or are
silent are left out and listed in OUT/left_out.csv. Files already written are kept (a second run is fast), so a
folder holds one set of choices (OUT/plan.json): a run with others into it is refused. --tasks is one of them: the
tasks draw their pictures from one generator in turn, so `--tasks class` pairs the class clips with other pictures
than the default (every task) does; to rerun a result, prepare with the tasks it was prepared with.
"""
import argparse
import gzip
import json
import multiprocessing as mp
import re
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `python prepare/avdigits.py`
from media import audio_info, read_audio  # noqa: E402
from extract import SILENCE_DBFS, write_csv  # noqa: E402

SOURCES = {  # public copies, fetched when --src is not given
    'mnist/images-idx3-ubyte.gz': 'https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz',
    'mnist/labels-idx1-ubyte.gz': 'https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz',
    'fsdd.zip': 'https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/heads/master.zip',
}
RECORDING = re.compile(r'^(?P<digit>\d)_(?P<speaker>[a-z]+)_(?P<take>\d+)$')
CELL = 28  # an MNIST digit; the localization canvas is 2 x 2 cells


# ---------------------------------------------------------------------------------------------------- sources

def read_idx(path):
    """An IDX file (gzipped or not) as a uint8 array: (n, rows, cols) images or (n,) labels."""
    opener = gzip.open if str(path).endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    magic, n = int.from_bytes(data[:4], 'big'), int.from_bytes(data[4:8], 'big')
    if magic == 2051:
        rows, cols = int.from_bytes(data[8:12], 'big'), int.from_bytes(data[12:16], 'big')
        x = np.frombuffer(data, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)
    elif magic == 2049:
        x = np.frombuffer(data, np.uint8, n, 8)
    else:
        raise ValueError(f"{path}: not an IDX file of images (2051) or labels (2049); magic number {magic}")
    return x


def fetch_sources(folder):
    """Download MNIST's test set and FSDD into `folder` (once), as --src expects them."""
    folder = Path(folder)
    for name, url in SOURCES.items():
        target = folder / name
        if target.exists() or (name == 'fsdd.zip' and (folder / 'fsdd').is_dir()):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url}", file=sys.stderr)
        urllib.request.urlretrieve(url, target.with_name(target.name + '.part'))
        target.with_name(target.name + '.part').rename(target)
    if not (folder / 'fsdd').is_dir():
        with zipfile.ZipFile(folder / 'fsdd.zip') as z:
            (folder / 'fsdd.tmp').mkdir(exist_ok=True)
            for member in z.namelist():
                if member.endswith('.wav') and '/recordings/' in member:
                    (folder / 'fsdd.tmp' / Path(member).name).write_bytes(z.read(member))
        (folder / 'fsdd.tmp').rename(folder / 'fsdd')
    return folder


def read_recordings(folder):
    """FSDD recordings [(path, digit, speaker)] in name order, and the left-out report of those that cannot be
    used (unreadable, silent)."""
    found, left_out = [], []
    for path in sorted(Path(folder).glob('*.wav')):
        m = RECORDING.match(path.stem)
        if not m:
            continue
        try:
            audio_info(path)
            peak = np.abs(read_audio(path)[0]).max()
            reason = f"silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS)" \
                if peak <= 10 ** (SILENCE_DBFS / 20) else None
        except ValueError as e:
            reason = f"unreadable ({e})"
        if reason:
            left_out.append({'key': path.stem, 'split': '', 'file': str(path), 'reason': reason})
        else:
            found.append((path, int(m['digit']), m['speaker'], int(m['take'])))
    if not found:
        raise ValueError(f"{folder}: no recordings named <digit>_<speaker>_<take>.wav")
    return found, left_out


# ---------------------------------------------------------------------------------------------------- tasks

def split_of(speaker, take, args):
    """'test', 'val' or 'train': by take (--split takes), or by the --test_speakers / --val_speakers lists, then
    --val_takes (--split speakers)."""
    if args.split == 'takes':
        return 'test' if take in args.test_takes else 'val' if take in args.val_takes else 'train'
    if speaker in args.test_speakers.split(','):
        return 'test'
    if speaker in args.val_speakers.split(','):
        return 'val'
    return 'val' if take in args.val_takes else 'train'


def take_range(text):
    """'0-4' -> {0, 1, 2, 3, 4}; '' -> no take."""
    if not text:
        return set()
    m = re.fullmatch(r'(\d+)-(\d+)', text)
    if not m or int(m[1]) > int(m[2]):
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIRST-LAST, e.g. 0-4")
    return set(range(int(m[1]), int(m[2]) + 1))


def picture_pools(labels, fractions):
    """{split: {digit: [picture indices]}}: the pictures cut in index order into train, val, test."""
    edges = np.cumsum([0] + list(fractions)) / sum(fractions) * len(labels)
    pools = {}
    for split, lo, hi in zip(('train', 'val', 'test'), edges[:-1], edges[1:]):
        idx = np.arange(int(lo), int(hi))
        pools[split] = {d: idx[labels[idx] == d].tolist() for d in range(10)}
    return pools


class Deck:
    """Pictures of each digit drawn without replacement, reshuffled when used up: spread evenly over clips."""

    def __init__(self, pool, rng):
        self.pool, self.rng, self.left = pool, rng, {d: [] for d in pool}

    def draw(self, digit):
        if not self.left[digit]:
            if not self.pool[digit]:
                raise ValueError(f"no picture of digit {digit} in this split: give more pictures to it")
            self.left[digit] = self.rng.permutation(self.pool[digit]).tolist()
        return self.left[digit].pop()


def plan(recordings, labels, args):
    """Every clip to write: {task: {split: [clip dicts]}}, all choices from --seed."""
    rng = np.random.default_rng(args.seed)
    pools = picture_pools(labels, [float(f) for f in args.picture_split.split(',')])
    decks = {split: Deck(pool, rng) for split, pool in pools.items()}
    tasks = args.tasks.split(',')
    clips = {t: {} for t in tasks}
    spoken, voices = {}, np.random.default_rng([args.seed, 1])  # (split, digit): its recordings, for --speak_each
    for path, digit, speaker, take in recordings:
        spoken.setdefault((split_of(speaker, take, args), digit), []).append(f'audio/{path.name}')
    for n in range(args.pairings):
        for path, digit, speaker, take in recordings:
            split = split_of(speaker, take, args)
            audio = f'audio/{path.name}'
            if 'class' in tasks or 'separate' in tasks:
                picture = decks[split].draw(digit)
                for task in {'class', 'separate'} & set(tasks):
                    clips[task].setdefault(split, []).append(dict(picture=picture, audio=audio, label=digit))
            if 'localize' in tasks:
                others = rng.permutation([d for d in range(10) if d != digit])[:int(rng.integers(1, 4))]
                cells = rng.permutation(4)[:len(others) + 1].tolist()  # the spoken digit's cell first
                pictures = [decks[split].draw(d) for d in [digit, *others]]
                clips['localize'].setdefault(split, []).append(dict(pictures=pictures, cells=cells, audio=audio,
                                                                    label=digit))
                # --speak_each: the same canvas again with each other digit on it spoken (a recording of it drawn
                # from the split, by its own generator: the other clips stay those of the default), so that the
                # picture alone does not tell which cell is the answer.
                for k, d in enumerate(map(int, others) if args.speak_each and split == 'train' else []):
                    if (split, d) in spoken:
                        order = [k + 1] + [i for i in range(len(cells)) if i != k + 1]  # the spoken digit first
                        clips['localize'][split].append(dict(
                            pictures=[pictures[i] for i in order], cells=[cells[i] for i in order], label=d,
                            audio=spoken[split, d][int(voices.integers(len(spoken[split, d])))]))
    return clips


def pairs_for(clips, rng):
    """Evaluation pairs of separation: each clip with a clip of another digit, (source_1, source_2) keys."""
    rows = []
    for i, clip in enumerate(clips):
        while True:
            j = int(rng.integers(len(clips)))
            if clips[j]['label'] != clip['label']:
                break
        rows.append({'source_1': clip['key'], 'source_2': clips[j]['key'], 'class_1': clip['label'],
                     'class_2': clips[j]['label']})
    return rows


# ---------------------------------------------------------------------------------------------------- writing

def fill_cell(digit):
    """An MNIST digit enlarged to fill its cell: cropped to its ink and resized (aspect kept, centred), so
    that every patch of the cell shows part of the digit rather than MNIST's empty margin of 4 pixels, and the
    cell is the digit's extent, as the mask says."""
    ys, xs = np.nonzero(digit > 32)
    if len(ys) == 0:
        return digit
    crop = digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    side = max(crop.shape)
    square = np.zeros((side, side), np.uint8)
    y0, x0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return np.asarray(Image.fromarray(square).resize((CELL - 2, CELL - 2), Image.BILINEAR).crop((-1, -1, CELL - 1,
                                                                                               CELL - 1)))


def write_pictures(job):
    """Write one clip's picture (and mask): job = (out folder, clip dict, images array)."""
    out, clip, images = job
    target = Path(out) / clip['image']
    if target.exists() and ('mask' not in clip or (Path(out) / clip['mask']).exists()):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if 'pictures' not in clip:
        Image.fromarray(images[clip['picture']]).convert('RGB').save(target)
        return
    canvas = np.zeros((2 * CELL, 2 * CELL), np.uint8)
    mask = np.zeros_like(canvas)
    for k, (picture, cell) in enumerate(zip(clip['pictures'], clip['cells'])):
        r, c = divmod(cell, 2)
        canvas[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = fill_cell(images[picture])
        if k == 0:  # the spoken digit
            mask[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = clip['label'] + 1
    Image.fromarray(canvas).convert('RGB').save(target)
    Image.fromarray(mask).save(Path(out) / clip['mask'])


def resolve_split(p, args):
    """Fill in the defaults of --split's flags, and refuse flags of the other protocol, or takes in two splits."""
    if args.split == 'takes':
        if args.test_speakers is not None or args.val_speakers is not None:
            p.error("--test_speakers / --val_speakers hold voices out: they need --split speakers")
        args.test_takes = take_range('0-4') if args.test_takes is None else args.test_takes
        args.val_takes = take_range('5-9') if args.val_takes is None else args.val_takes
        if args.test_takes & args.val_takes:
            p.error(f"--test_takes and --val_takes share takes {sorted(args.test_takes & args.val_takes)}")
    else:
        if args.test_takes is not None:
            p.error("--test_takes belongs to --split takes; --split speakers holds out --test_speakers")
        args.test_speakers = 'theo' if args.test_speakers is None else args.test_speakers
        args.val_speakers = 'nicolas' if args.val_speakers is None else args.val_speakers
        args.val_takes = set() if args.val_takes is None else args.val_takes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', default='', help='folder with mnist/ (IDX files) and fsdd/ (WAV files); default: '
                                             'download the public sources into OUT/sources')
    p.add_argument('--out', required=True, help='output folder: pictures, audio, manifests, left_out.csv')
    p.add_argument('--tasks', default='class,localize,separate', help='(default: class,localize,separate)')
    p.add_argument('--split', default='takes', choices=['takes', 'speakers'],
                   help="takes: FSDD's own split, by take, every voice in every split (default); speakers: "
                        "by voice, the test and validation voices unheard in training")
    p.add_argument('--test_takes', type=take_range, default=None, metavar='FIRST-LAST',
                   help="--split takes: the test takes of every voice (default: 0-4, FSDD's test set)")
    p.add_argument('--test_speakers', default=None, help="--split speakers: held-out speakers, joined by ',' "
                                                         "(default: theo)")
    p.add_argument('--val_speakers', default=None, help="--split speakers: validation speakers (default: nicolas)")
    p.add_argument('--val_takes', type=take_range, default=None, metavar='FIRST-LAST',
                   help="validate on these takes: of every voice under --split takes (default: 5-9); of the "
                        "training speakers under --split speakers, e.g. 0-4 (default: none)")
    p.add_argument('--picture_split', default='0.6,0.2,0.2', help='fractions of the MNIST pictures for train, '
                                                                  'val, test (default: 0.6,0.2,0.2)')
    p.add_argument('--pairings', type=int, default=1, help='clips per recording, each with other pictures '
                                                           '(default: 1)')
    p.add_argument('--speak_each', action='store_true',
                   help="localize: every training canvas once per digit on it, each spoken by a recording of that "
                        "digit, so that the picture alone does not say which cell is spoken (default: once, its "
                        "recording's digit; held-out canvases are always once)")
    p.add_argument('--seed', type=int, default=0, help='(default: 0)')
    p.add_argument('--workers', type=int, default=4, help='processes writing pictures (default: 4)')
    args = p.parse_args(argv)
    resolve_split(p, args)
    out = Path(args.out)
    unknown = set(args.tasks.split(',')) - {'class', 'localize', 'separate'}
    if unknown:
        p.error(f"--tasks: unknown {sorted(unknown)}; choose from class, localize, separate")
    src = Path(args.src) if args.src else fetch_sources(out / 'sources')
    images = read_idx(src / 'mnist' / 'images-idx3-ubyte.gz')
    labels = read_idx(src / 'mnist' / 'labels-idx1-ubyte.gz')
    if len(images) != len(labels):
        raise ValueError(f"{src / 'mnist'}: {len(images)} images but {len(labels)} labels")
    recordings, left_out = read_recordings(src / 'fsdd')
    (out / 'audio').mkdir(parents=True, exist_ok=True)
    for path, *_ in recordings:  # the recordings as they are (8 kHz): the loader resamples
        if not (out / 'audio' / path.name).exists():
            shutil.copyfile(path, out / 'audio' / path.name)
    choices = check_plan(p, args, out)
    clips = plan(recordings, labels, args)
    (out / 'plan.json').write_text(json.dumps(choices, indent=1) + '\n')  # before any picture: an interrupted run
    jobs = []
    for task, splits in clips.items():
        for split, rows in splits.items():
            for k, clip in enumerate(rows):
                clip['key'] = f"{task}_{split}_{k:05d}"
                folder = 'pictures' if task != 'localize' else 'localize'
                clip['image'] = f"{folder}/{clip['picture']:05d}.png" if 'picture' in clip else \
                    f"{folder}/{clip['key']}.png"
                if task == 'localize':
                    clip['mask'] = f"{folder}/{clip['key']}_mask.png"
                jobs.append((str(out), clip, images))
    write_all(jobs, args.workers)
    write_manifests(clips, out, args.seed)
    write_csv(out / 'left_out.csv', left_out, ['key', 'split', 'file', 'reason'])
    print(', '.join(f"{task}: " + ' / '.join(f"{len(rows)} {split}" for split, rows in sorted(s.items()))
                    for task, s in clips.items()) + f"; left out {len(left_out)} recording(s); in {out}")
    return clips


def check_plan(p, args, out):
    """The choices that decide OUT's clips, refusing a folder prepared with others (or with no plan.json)."""
    # Pictures already written are kept, so a folder holds one plan: refuse another rather than mix two.
    choices = {k: str(sorted(v.split(',')) if k == 'tasks' else v) for k, v in sorted(vars(args).items())
               if k not in ('src', 'out', 'workers')}
    stamp = out / 'plan.json'
    old = json.loads(stamp.read_text()) if stamp.exists() else None
    if old is None and any(out.glob('*_train.csv')):
        p.error(f"--out {out} holds manifests of an unknown plan (no plan.json): give another --out")
    if old is not None and old != choices:
        changed = sorted(k for k in choices if old.get(k) != choices[k])
        p.error(f"--out {out} was prepared with other choices ({', '.join(f'--{k} {old.get(k)}' for k in changed)}): "
                f"its pictures would not match the new manifests; give another --out")
    return choices


def write_all(jobs, workers):
    """write_pictures over the jobs, in `workers` processes (0 or 1: in this one)."""
    if workers <= 1:
        for job in tqdm(jobs, desc='avdigits', dynamic_ncols=True):
            write_pictures(job)
        return
    images = jobs[0][2] if jobs else None  # sent once per worker, not once per job
    with mp.get_context('spawn').Pool(workers, initializer=_init_worker, initargs=(images,)) as pool:
        for _ in tqdm(pool.imap_unordered(_write_in_worker, [(o, c) for o, c, _ in jobs], chunksize=64),
                      total=len(jobs), desc='avdigits', dynamic_ncols=True):
            pass


_IMAGES = None


def _init_worker(images):
    global _IMAGES
    _IMAGES = images


def _write_in_worker(job):
    write_pictures((*job, _IMAGES))


def write_manifests(clips, out, seed):
    """OUT/<task>_<split>.csv, and the separation pairs of the held-out splits."""
    rng = np.random.default_rng(seed + 1)
    for task, splits in clips.items():
        for split, rows in splits.items():
            columns = ['key', 'image', 'audio', 'label'] + (['mask'] if task == 'localize' else [])
            write_csv(out / f'{task}_{split}.csv', rows, columns)
            if task == 'separate' and split != 'train':
                write_csv(out / f'separate_{split}_pairs.csv', pairs_for(rows, rng),
                          ['source_1', 'source_2', 'class_1', 'class_2'])


if __name__ == '__main__':
    main()
