"""Prepare VGGSound (Chen et al., ICASSP 2020) from its CSV and a folder of downloaded clips.

    python prepare/vggsound.py --csv vggsound.csv --videos DIR --out OUT [--workers N]

vggsound.csv is the dataset's list (no header): youtube_id,start_seconds,label,split with split 'train' or
'test'. A clip's file is found under --videos by id and start in the names the common downloads use
(---g-f_I2yQ_000001.mp4, --4gqARaEJE_0.000.mp4, ..._30.000_40.000.mkv; sub-folders are searched too), or by
--name_pattern. Each clip becomes a few frames and its 16 kHz mono audio (prepare/extract.py), listed in
OUT/train.csv and OUT/test.csv, manifests that pretrain.py and finetune.py read with --data; every clip left out
is in OUT/left_out.csv with the reason. A run skips the clips an earlier run finished.

Copies of VGGSound typically lack about a fifth of the clips (videos removed from YouTube): results should say
on which clips they were measured, which the manifests and the report record.
"""
import argparse

from extract import add_common_flags, find_video, finish, index_videos, list_rows, run


def read_list(path):
    """The rows of vggsound.csv as (youtube id, start seconds, label, split)."""
    rows = []
    for where, row in list_rows(path):
        if len(row) != 4:
            raise ValueError(f"{where}: expected youtube_id,start_seconds,label,split, got {row}")
        ytid, start, label, split = (c.strip() for c in row)
        try:
            start = float(start)
        except ValueError:
            raise ValueError(f"{where}: start_seconds {start!r} is not a number") from None
        rows.append((ytid, start, label, split))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--csv', required=True, help="the dataset's list: youtube_id,start_seconds,label,split")
    add_common_flags(p)
    args = p.parse_args(argv)
    clips = read_list(args.csv)
    index = index_videos(args.videos)
    jobs = [dict(key=f"{ytid}_{int(start):06d}", video=find_video(args.videos, index, ytid, start, args.name_pattern),
                 label=label, split=split, order=i, out=args.out, fps=args.fps, short_side=args.short_side,
                 min_seconds=args.min_seconds)
            for i, (ytid, start, label, split) in enumerate(clips)]
    results = run(jobs, args.workers, 'vggsound')
    return finish(results, args.out, sorted({j['split'] for j in jobs}))


if __name__ == '__main__':
    main()
