"""Prepare solo-instrument clips for mix-and-separate (--task separate): VGGSound-Music with the official
evaluation pairs, or MUSIC (Zhao et al., ECCV 2018, "The Sound of Pixels") with pairs drawn once.

    python prepare/music.py --dataset vggsound_music --train_list vggmusic_train.txt \\
        --pairs vggmusic_eval_ss.csv --videos DIR --out OUT [--workers N]
    python prepare/music.py --dataset music --solo MUSIC_solo_videos.json --videos DIR --out OUT

VGGSound-Music (DeepAVFusion's metadata/): vggmusic_train.txt lists the training clips, `<youtube id>_<start,
6 digits>,<instrument>` per line, no header; vggmusic_eval_ss.csv the evaluation pairs, with a header
source_1,source_2,class_1,class_2,sep_type (1,201 pairs of 1,201 clips, none in the training list; sep_type Hard
exactly when both clips play the same instrument). A clip's file is found under --videos by id and start as
prepare/vggsound.py finds it (DeepAVFusion's own names, playing_<class>/<id>_<start>_<end>.mp4, included).
Labels follow the training list's names: a pair list's 'violin,_fiddle' (VGGSound's "playing violin, fiddle")
is 'violin'.

MUSIC: MUSIC_solo_videos.json ({"videos": {instrument: [youtube ids]}}, github.com/roudimit/MUSIC_dataset); a
video's file is found by its id (<id>.mp4, sub-folders too) or --name_pattern. The held-out videos are the
official ones: of the ids whose file is there, sorted, every (n // --held_out)-th (DeepAVFusion datasets.py
get_music, --held_out 130), the rest train. DeepAVFusion mixes each held-out clip with a random other one at
every evaluation; here each is paired once with a random other (--seed), so that runs compare on the same pairs.
A video is one clip (the official code reads pre-cut segments of it, which are not public).

Each clip is cut as prepare/extract.py describes (frames, 16 kHz mono audio.wav). Writes OUT/train.csv and
OUT/test.csv (image, fps, audio, label, key) and OUT/test_pairs.csv, the pairs in the format finetune.py reads
beside test.csv (source_1,source_2,class_1,class_2,sep_type, clips named by `key`). A pair that lost a clip is
left out of it and listed in OUT/left_out.csv ('pair line N', with the clip and its reason), with every clip left
out. A second run skips the clips an earlier run finished.
"""
import argparse
import csv
import json
import re

import numpy as np

from extract import add_common_flags, find_video, finish, index_videos, list_rows, run, write_csv

KEY = re.compile(r'^(?P<id>[A-Za-z0-9_-]{11})_(?P<start>\d{6})$')  # VGGSound-Music's clip names
PAIR_COLUMNS = ['source_1', 'source_2', 'class_1', 'class_2', 'sep_type']


def music_label(name):
    """An instrument name in the training list's form: the pair list's 'violin,_fiddle' (a VGGSound class with
    its spaces made '_') is the training list's 'violin'."""
    return name.split(',')[0].strip()


def parse_key(key, where):
    """(youtube id, start seconds) of a clip name `<id>_<start, 6 digits>`; ValueError naming `where` if not."""
    m = KEY.match(key)
    if not m:
        raise ValueError(f"{where}: {key!r} is not a clip name <youtube id>_<start, 6 digits>")
    return m['id'], int(m['start'])


def read_train_list(path):
    """[(key, label)] from vggmusic_train.txt (key,instrument per line, no header)."""
    clips = []
    for where, row in list_rows(path):
        if len(row) != 2:
            raise ValueError(f"{where}: expected <clip>,<instrument>, got {row}")
        parse_key(row[0].strip(), where)
        clips.append((row[0].strip(), music_label(row[1])))
    return clips


def read_pairs(path):
    """The rows of an evaluation pair list (header source_1,source_2[,class_1,class_2,sep_type]) as dicts with
    their line number; every source checked to be a clip name."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not {'source_1', 'source_2'} <= set(header):
            raise ValueError(f"{path}: a pair list needs columns source_1,source_2 (its header is: "
                             f"{', '.join(header) or 'empty'})")
        rows = []
        for n, row in enumerate(reader, 2):
            row = {k.strip(): (v or '').strip() for k, v in row.items() if k is not None}
            for side in ('source_1', 'source_2'):
                parse_key(row[side], f"{path}, line {n}, {side}")
            rows.append({**row, 'line': n})
    return rows


def test_clips(pairs, path):
    """The evaluation clips [(key, label)] in order of first appearance in the pairs; a clip named with two
    different classes is an error naming both lines."""
    seen = {}
    for row in pairs:
        for side in ('1', '2'):
            key, label = row[f'source_{side}'], music_label(row.get(f'class_{side}', ''))
            if key in seen and seen[key][0] != label:
                raise ValueError(f"{path}, lines {seen[key][1]} and {row['line']}: clip {key} is both "
                                 f"{seen[key][0]!r} and {label!r}")
            seen.setdefault(key, (label, row['line']))
    return [(key, label) for key, (label, _) in seen.items()]


def read_solo(path):
    """[(youtube id, instrument)] from MUSIC_solo_videos.json ({"videos": {instrument: [ids]}})."""
    with open(path) as f:
        data = json.load(f)
    videos = data.get('videos') if isinstance(data, dict) else None
    if not isinstance(videos, dict) or not all(isinstance(v, list) for v in videos.values()):
        raise ValueError(f"{path}: expected {{\"videos\": {{instrument: [youtube ids]}}}} (MUSIC_solo_videos.json)")
    return [(vid, instrument) for instrument, ids in videos.items() for vid in ids]


def held_out_ids(ids, target=130):
    """The official MUSIC held-out videos: of the (available) ids, sorted, every (n // target)-th
    (DeepAVFusion datasets.py get_music: solo_video_ids[::len(solo_video_ids) // 130])."""
    ids = sorted(ids)
    return set(ids[::max(len(ids) // target, 1)])


def draw_pairs(clips, seed):
    """Each held-out clip [(key, label)] with a random other one, as the official MUSIC evaluation mixes them,
    drawn once (--seed); sep_type Hard when both play the same instrument, as in vggmusic_eval_ss.csv."""
    if len(clips) < 2:
        raise ValueError(f"{len(clips)} held-out clip(s): at least 2 are needed to make pairs")
    rng = np.random.default_rng(seed)
    rows = []
    for i, (key, label) in enumerate(clips):
        j = int(rng.integers(len(clips) - 1))
        j += j >= i  # any clip but itself
        rows.append({'source_1': key, 'source_2': clips[j][0], 'class_1': label, 'class_2': clips[j][1],
                     'sep_type': 'Hard' if label == clips[j][1] else 'Easy'})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', required=True, choices=['vggsound_music', 'music'])
    p.add_argument('--train_list', default='', help='vggsound_music: vggmusic_train.txt')
    p.add_argument('--pairs', default='', help='vggsound_music: vggmusic_eval_ss.csv, the evaluation pairs')
    p.add_argument('--solo', default='', help='music: MUSIC_solo_videos.json (or MUSIC21_solo_videos.json)')
    p.add_argument('--held_out', type=int, default=130, help='music: about this many held-out videos, every '
                                                             '(n // held_out)-th by id (default: 130, official)')
    p.add_argument('--seed', type=int, default=0, help='music: the draw of the evaluation pairs (default: 0)')
    add_common_flags(p)
    args = p.parse_args(argv)
    needed = ['train_list', 'pairs'] if args.dataset == 'vggsound_music' else ['solo']
    missing = [f'--{n}' for n in needed if not getattr(args, n)]
    if missing:
        p.error(f"--dataset {args.dataset} needs {' and '.join(missing)}")
    index = index_videos(args.videos)
    common = dict(out=args.out, fps=args.fps, short_side=args.short_side, min_seconds=args.min_seconds)
    jobs = []
    if args.dataset == 'vggsound_music':
        pairs = read_pairs(args.pairs)
        for split, clips in (('train', read_train_list(args.train_list)), ('test', test_clips(pairs, args.pairs))):
            for key, label in clips:
                ytid, start = parse_key(key, '')
                jobs.append(dict(key=key, label=label, split=split, order=len(jobs), **common,
                                 video=find_video(args.videos, index, ytid, start, args.name_pattern)))
    else:
        videos = [(vid, label, find_video(args.videos, index, vid, 0, args.name_pattern))
                  for vid, label in read_solo(args.solo)]
        held_out = held_out_ids([vid for vid, _, found in videos if found], args.held_out)
        for vid, label, found in videos:  # a video not found belongs to no split: reported, split ''
            split = ('test' if vid in held_out else 'train') if found else ''
            jobs.append(dict(key=vid, label=label, split=split, order=len(jobs), video=found, **common))
    results = run(jobs, args.workers, args.dataset)
    reasons = {job['key']: reason for job, reason in results if job['split'] == 'test'}
    if args.dataset == 'vggsound_music':
        kept, dropped = [], []
        for row in pairs:
            lost = [row[s] for s in ('source_1', 'source_2') if reasons[row[s]] is not None]
            if lost:  # never replaced by another pair: counted and listed
                dropped.append({'key': f"pair line {row['line']}", 'split': 'pairs', 'file': args.pairs,
                                'reason': f"clip left out ({lost[0]}: {reasons[lost[0]]})"})
            else:
                kept.append(row)
    else:
        order = sorted((job['order'], job['key'], job['label']) for job, reason in results
                       if reason is None and job['split'] == 'test')
        kept, dropped = draw_pairs([(key, label) for _, key, label in order], args.seed), []
    written = finish(results, args.out, ['train', 'test'], extra_left=dropped)
    columns = [c for c in PAIR_COLUMNS if all(c in row for row in kept)] if kept else PAIR_COLUMNS
    write_csv(f"{args.out}/test_pairs.csv", kept, columns)
    print(f"test_pairs.csv: {len(kept)} pairs" + (f" ({len(dropped)} left out: a clip is missing)" if dropped else ''))
    return written, kept


if __name__ == '__main__':
    main()
