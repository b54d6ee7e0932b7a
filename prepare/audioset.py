"""Prepare AudioSet (Gemmeke et al., ICASSP 2017) from its segment lists and a folder of downloaded clips.

    python prepare/audioset.py --segments balanced_train_segments.csv eval_segments.csv \\
        --labels class_labels_indices.csv --videos DIR --out OUT [--workers N]

A segment list has comment lines starting with '#' and rows `YTID, start_seconds, end_seconds, "mid,mid,..."`;
class_labels_indices.csv (with a header: index,mid,display_name) names each label id. Every segment list
becomes one multi-label manifest, OUT/<list's name>.csv (e.g. OUT/eval_segments.csv), whose `label` column is the
clip's classes by display name joined by ';', the form finetune.py reads as multi-label (mAP, Table 2). A clip's
file is found under --videos by id and start (--4gqARaEJE_30.000.mp4, --4gqARaEJE_30.000_40.000.mkv,
--4gqARaEJE_000030.mp4), or by --name_pattern. Clips are cut as prepare/extract.py describes; every clip left out
is in OUT/left_out.csv with the reason, and a second run skips the clips an earlier run finished.
"""
import argparse
import csv
from pathlib import Path

from extract import add_common_flags, find_video, finish, index_videos, run


def read_labels(path):
    """{mid: display name} from class_labels_indices.csv."""
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or not {'mid', 'display_name'} <= set(rows[0]):
        raise ValueError(f"{path}: expected a header with 'mid' and 'display_name' (class_labels_indices.csv)")
    names = {r['mid']: r['display_name'].strip() for r in rows}
    bad = [n for n in names.values() if ';' in n]
    if bad:  # ';' separates the labels of a multi-label row
        raise ValueError(f"{path}: display names may not contain ';': {bad[:3]}")
    return names


def read_segments(path, names=None):
    """The rows of a segment list as (youtube id, start, end, labels joined by ';'); with names=None the label
    ids are kept as they are (the downloader needs no label index)."""
    rows = []
    with open(path, newline='') as f:
        for n, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or row[0].startswith('#') or not row[0].strip():
                continue
            if len(row) != 4:
                raise ValueError(f'{path}, line {n}: expected YTID, start_seconds, end_seconds, "labels", got {row}')
            ytid, start, end, mids = (c.strip() for c in row)
            try:
                start, end = float(start), float(end)
            except ValueError:
                raise ValueError(f"{path}, line {n}: start/end {row[1]!r}, {row[2]!r} are not numbers") from None
            if names is None:
                rows.append((ytid, start, end, mids))
                continue
            unknown = [m for m in mids.split(',') if m not in names]
            if unknown:
                raise ValueError(f"{path}, line {n}: label ids {unknown} are not in the label index (--labels)")
            rows.append((ytid, start, end, ';'.join(names[m] for m in mids.split(','))))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--segments', nargs='+', required=True, help='segment lists (e.g. balanced_train_segments.csv '
                                                                'eval_segments.csv), one manifest each')
    p.add_argument('--labels', required=True, help='class_labels_indices.csv: index,mid,display_name')
    add_common_flags(p)
    args = p.parse_args(argv)
    names = read_labels(args.labels)
    index = index_videos(args.videos)
    jobs = []
    for segments in args.segments:
        split = Path(segments).stem
        for ytid, start, end, labels in read_segments(segments, names):
            jobs.append(dict(key=f"{ytid}_{int(round(start)):06d}", label=labels, split=split, order=len(jobs),
                             video=find_video(args.videos, index, ytid, start, args.name_pattern, end),
                             out=args.out, fps=args.fps, short_side=args.short_side, min_seconds=args.min_seconds))
    results = run(jobs, args.workers, 'audioset')
    return finish(results, args.out, list(dict.fromkeys(j['split'] for j in jobs)))


if __name__ == '__main__':
    main()
