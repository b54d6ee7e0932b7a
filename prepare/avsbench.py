"""Prepare AVSBench (Zhou et al., ECCV 2022: S4 and MS3; AVSS, Zhou et al. 2023) for --task segment.

    python prepare/avsbench.py --layout s4 --root AVSBench/Single-source --out OUT
    python prepare/avsbench.py --layout ms3 --root AVSBench/Multi-sources --out OUT
    python prepare/avsbench.py --layout avss --root AVSBench-semantic --out OUT [--subsets v1s,v1m,v2]

One manifest row per annotated frame: the frame, the clip's whole audio, the frame's mask (rewritten as a PNG of
class values, 0 background) and `start`, where the 3 s audio window starts: centred on the frame, kept inside the
clip. OUT/<split>.csv for every split of the metadata (train, val, test), OUT/masks/, OUT/left_out.csv (every
frame left out and why: missing file (audio, frame or mask), unreadable, mask size differs from its frame, bad
mask (colours not in the AVSS palette, values above 70)). Frames and audio stay where they are: the manifests
point at them, relative to OUT. A second run keeps the masks an earlier run wrote.

The layouts, as the AVSBench releases ship them (OpenNLPLab/AVSBench, avs_scripts/*/config.py and dataloader.py):

    s4    ROOT/s4_meta_data.csv (the clip's name first, then columns category and split), ROOT/s4_data/
          visual_frames/{split}/{category}/{name}/{name}_{i}.png and gt_masks/.../{name}_{i}.png, i = 1..5 (a
          training clip has the mask of its first frame only), audio_wav/{split}/{category}/{name}.wav
    ms3   ROOT/ms3_meta_data.csv (name first, then split), ROOT/ms3_data/visual_frames/{name}/{name}.mp4_{i}.png,
          gt_masks/{split}/{name}/{name}_{i}.png (all 5 annotated), audio_wav/{split}/{name}.wav
    avss  ROOT/metadata.csv (vid,uid,s_min,s_sec,a_obj,split,label; label is the subset: v1s = S4's clips, v1m =
          MS3's, v2 = the new 10 s clips), ROOT/{label}/{uid}/frames/{k}.jpg, labels_rgb/{k}.png (colours of the
          AVSS palette; --labels semantic reads labels_semantic/{k}.png, class values) and audio.wav, k from 0;
          5 frames for v1s and v1m (a v1s training clip: the first annotated only), 10 for v2

Masks: S4 and MS3 are binary (value 1 = sounding object; finetune.py --seg_classes 1). AVSS masks hold the class
value, 0 background, 1..70 the classes in label2idx.json's order (its 'background' is 1 and each value there is
ours + 1), so finetune.py --seg_classes 70 reads them; OUT/classes.csv names the values when ROOT/label2idx.json is
there. The official DeepAVFusion code reads S4 and MS3 from the AVSS release (datasets.py get_avsbench_s4/_ms3:
the v1s / v1m rows of metadata.csv, labels_semantic > 0), which is --layout avss --subsets v1s (or v1m) with
--seg_classes 1 here; it trains on 'train' and evaluates on 'val' (datasets.py load_dataset), every annotated
frame of a clip (eval_avsegm.py: dense=True).
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `python prepare/avsbench.py`
from data import CLIP_SECONDS  # noqa: E402
from media import audio_info  # noqa: E402
from extract import REPORT_COLUMNS, count_reasons, parallel_map, relative, save_image, write_csv  # noqa: E402

AVSS_FRAMES = {'v1s': 5, 'v1m': 5, 'v2': 10}  # frames per clip, one per second (color_dataloader.py)
AVSS_CLASSES = 71  # background + 70 (avs_scripts/avss/config.py NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------- timing

def frame_start(k, duration, offset=0.5):
    """Where the 3 s audio window of frame k starts, in seconds: centred on the frame's time, k + offset (one
    frame per second), then kept inside a clip of `duration` seconds as data.window_start keeps it, so the value
    written is the one used. The official loader does the same: start = max(min(k + 0.5 - 1.5, duration - 3), 0)
    (DeepAVFusion datasets.py, FolderVideoDataset). At the clip's edges the window cannot be centred: in a 5 s
    clip frames 0 and 1 both get [0, 3] and frames 3 and 4 both [2, 5]."""
    return min(max(k + offset - CLIP_SECONDS / 2, 0.0), max(duration - CLIP_SECONDS, 0.0))


# ---------------------------------------------------------------------------------------------------- masks

def avss_palette(n=AVSS_CLASSES):
    """(n, 3) uint8: the colour of each AVSS class value in labels_rgb, the PASCAL VOC colour map AVSBench draws
    them with (avs_scripts/avss/color_dataloader.py, get_v2_pallete): the bits of the value, three at a time from
    the lowest, go into R, G and B from their top bit down. 0 (background) is black, 1 is (128, 0, 0)."""
    colours = np.zeros((n, 3), np.uint8)
    for value in range(n):
        rest, bit = value, 7
        while rest:
            for channel in range(3):
                colours[value, channel] |= ((rest >> channel) & 1) << bit
            rest, bit = rest >> 3, bit - 1
    return colours


def colours_to_values(rgb, palette):
    """(H, W, 3) colours -> (H, W) uint8 class values through the palette. Raises ValueError listing colours that
    are not in it (the official loader would silently make them background)."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    known = {(int(r) << 16) | (int(g) << 8) | int(b): v for v, (r, g, b) in enumerate(palette)}
    uniques, inverse = np.unique(code, return_inverse=True)
    unknown = [u for u in uniques.tolist() if u not in known]
    if unknown:
        shown = ', '.join(str((u >> 16, (u >> 8) & 255, u & 255)) for u in unknown[:3])
        raise ValueError(f"{len(unknown)} colour(s) not in the AVSS palette: {shown}")
    return np.array([known[u] for u in uniques.tolist()], np.uint8)[inverse.reshape(code.shape)]


def binary_mask(image):
    """A v1 ground-truth mask -> (H, W) uint8, 1 where the sounding object is. Palette and 1-bit masks are read by
    index (MS3's loader opens them in mode 'P'), others as grey at half range (S4's loader: PIL mode '1')."""
    if image.mode in ('P', '1'):
        return (np.asarray(image) > 0).astype(np.uint8)
    return (np.asarray(image.convert('L')) >= 128).astype(np.uint8)


def read_mask(path, kind):
    """The class values of the mask at `path`: kind 'binary' (S4, MS3), 'rgb' (AVSS labels_rgb) or 'semantic' (AVSS
    labels_semantic, values as they are). Returns (values, size); raises ValueError on colours or values that are
    not AVSS classes."""
    with Image.open(path) as m:
        m.load()
        if kind == 'binary':
            return binary_mask(m), m.size
        if kind == 'rgb':
            return colours_to_values(np.asarray(m.convert('RGB')), avss_palette()), m.size
        values = np.asarray(m if m.mode in ('L', 'P', 'I', 'I;16') else m.convert('L'))
        if values.max() >= AVSS_CLASSES:
            raise ValueError(f"value {int(values.max())} is not an AVSS class value (0..{AVSS_CLASSES - 1})")
        return values.astype(np.uint8), m.size


# ---------------------------------------------------------------------------------------------------- layouts

def read_metadata(path, columns):
    """The rows of a metadata CSV (with a header) as dicts; `columns` must be in its header. The clip's name is
    also given as 'name' (the first column: the v1 lists name it differently across releases)."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (its header is: {', '.join(header) or 'empty'})")
        rows = []
        for n, row in enumerate(reader, 2):
            row = {k.strip(): (v or '').strip() for k, v in row.items() if k is not None}
            if not row[header[0]]:
                continue
            empty = [c for c in columns if not row.get(c)]
            if empty:
                raise ValueError(f"{path}, line {n}: empty {empty}")
            rows.append({**row, 'name': row[header[0]], 'line': n})
    return rows


def clip_jobs(layout, root, labels='rgb', subsets=('v1s', 'v1m', 'v2')):
    """Every clip to prepare: dicts with key, split, audio, frames [(frame index, frame path, mask path)], the mask
    kind, and the extra manifest column (category or subset)."""
    root = Path(root)
    jobs = []
    if layout == 's4':
        for r in read_metadata(root / 's4_meta_data.csv', ['category', 'split']):
            base = f"{r['split']}/{r['category']}/{r['name']}"
            # Training clips have the first frame's mask only (AVSBench's S4Dataset: mask_num 1 for 'train').
            annotated = [1] if r['split'] == 'train' else range(1, 6)
            frames = [(i - 1, root / f"s4_data/visual_frames/{base}/{r['name']}_{i}.png",
                       root / f"s4_data/gt_masks/{base}/{r['name']}_{i}.png") for i in annotated]
            jobs.append(dict(key=r['name'], split=r['split'], audio=root / f's4_data/audio_wav/{base}.wav',
                             frames=frames, kind='binary', extra={'category': r['category']}))
    elif layout == 'ms3':
        for r in read_metadata(root / 'ms3_meta_data.csv', ['split']):
            name = r['name']
            # MS3's frames were saved under the video's file name ({name}.mp4_{i}.png, preprocess_ms3.py).
            frames = [(i - 1, root / f"ms3_data/visual_frames/{name}/{name}.mp4_{i}.png",
                       root / f"ms3_data/gt_masks/{r['split']}/{name}/{name}_{i}.png") for i in range(1, 6)]
            jobs.append(dict(key=name, split=r['split'], audio=root / f"ms3_data/audio_wav/{r['split']}/{name}.wav",
                             frames=frames, kind='binary', extra={}))
    else:
        folder = 'labels_rgb' if labels == 'rgb' else 'labels_semantic'
        for r in read_metadata(root / 'metadata.csv', ['uid', 'split', 'label']):
            if r['label'] not in AVSS_FRAMES:
                raise ValueError(f"{root / 'metadata.csv'}, line {r['line']}: label {r['label']!r} is not a subset "
                                 f"({', '.join(AVSS_FRAMES)})")
            if r['label'] not in subsets:
                continue
            clip = root / r['label'] / r['uid']
            # A v1s training clip has the first frame's label only (color_dataloader.py: gt_temporal_mask_flag).
            n = 1 if r['label'] == 'v1s' and r['split'] == 'train' else AVSS_FRAMES[r['label']]
            frames = [(k, clip / 'frames' / f'{k}.jpg', clip / folder / f'{k}.png') for k in range(n)]
            jobs.append(dict(key=f"{r['label']}_{r['uid']}", split=r['split'], audio=clip / 'audio.wav',
                             frames=frames, kind=labels, extra={'subset': r['label']}))
    return jobs


# ---------------------------------------------------------------------------------------------------- one clip

def prepare_clip(job):
    """Check one clip's audio and annotated frames and write their masks: (its position in the metadata, its
    split, manifest rows, report rows)."""
    rows, left = [], []

    def leave(k, file, reason):
        left.append({'key': f"{job['key']}_{k}", 'split': job['split'], 'file': str(file), 'reason': reason})

    audio = Path(job['audio'])
    if not audio.is_file():
        for k, _, _ in job['frames']:
            leave(k, audio, 'missing file (audio)')
        return job['order'], job['split'], rows, left
    try:
        rate, samples, _ = audio_info(audio)
    except ValueError as e:
        for k, _, _ in job['frames']:
            leave(k, audio, f"unreadable ({str(e).replace(str(audio) + ': ', '')})")
        return job['order'], job['split'], rows, left
    for k, frame, mask in job['frames']:
        if not Path(frame).is_file():
            leave(k, frame, 'missing file (frame)')
            continue
        if not Path(mask).is_file():
            leave(k, mask, 'missing file (mask)')
            continue
        try:
            with Image.open(frame) as im:
                size = im.size
                im.verify()  # a file cut short fails here, not in the middle of a run
        except Exception as e:
            leave(k, frame, f"unreadable ({type(e).__name__}: {e})")
            continue
        target = Path(job['out']) / 'masks' / job['key'] / f'{k}.png'
        if not target.is_file():  # written by an earlier run otherwise
            try:
                values, mask_size = read_mask(mask, job['kind'])
            except ValueError as e:  # colours or values that are not AVSS classes
                leave(k, mask, f"bad mask ({e})")
                continue
            except Exception as e:
                leave(k, mask, f"unreadable ({type(e).__name__}: {e})")
                continue
            if mask_size != size:  # the loader transforms frame and mask alike: they must be the same size
                leave(k, mask, f"mask size differs (mask {mask_size[0]}x{mask_size[1]}, frame {size[0]}x{size[1]})")
                continue
            save_image(Image.fromarray(values, 'L'), target)
        rows.append({'image': relative(frame, job['out']), 'audio': relative(audio, job['out']),
                     'mask': relative(target, job['out']),
                     'start': f"{frame_start(k, samples / rate, job['frame_offset']):g}",
                     'key': f"{job['key']}_{k}", **job['extra']})
    return job['order'], job['split'], rows, left


# ---------------------------------------------------------------------------------------------------- main

def write_classes(root, out):
    """OUT/classes.csv (value,name) from ROOT/label2idx.json, whose values are ours + 1 ('background': 1)."""
    path = Path(root) / 'label2idx.json'
    if not path.is_file():
        return None
    names = json.loads(path.read_text())
    rows = sorted(({'value': v - 1, 'name': k} for k, v in names.items()), key=lambda r: r['value'])
    if [r['value'] for r in rows] != list(range(len(rows))) or rows[0]['name'] != 'background':
        raise ValueError(f"{path}: expected values 1..{len(rows)} with 'background': 1")
    write_csv(Path(out) / 'classes.csv', rows, ['value', 'name'])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--layout', required=True, choices=['s4', 'ms3', 'avss'], help='which release (see above)')
    p.add_argument('--root', required=True, help="the release's folder: the one holding s4_meta_data.csv, "
                                                 "ms3_meta_data.csv or metadata.csv")
    p.add_argument('--out', required=True, help='output folder: <split>.csv manifests, masks/, left_out.csv')
    p.add_argument('--subsets', default='v1s,v1m,v2', help="avss: the subsets to keep (default: v1s,v1m,v2, "
                                                           "AVSS; v1s alone is DeepAVFusion's S4, v1m its MS3)")
    p.add_argument('--labels', choices=['rgb', 'semantic'], default='rgb',
                   help="avss: read labels_rgb through the palette (default, AVSBench's loader) or "
                        "labels_semantic as class values (DeepAVFusion's loader)")
    p.add_argument('--frame_offset', type=float, default=0.5,
                   help='when in its second frame k is shown, for centring its audio window (default: 0.5, as '
                        "DeepAVFusion's loader; AVSBench's extraction took the frame at 15/16 of the second)")
    p.add_argument('--workers', type=int, default=4, help='processes writing masks (default: 4)')
    args = p.parse_args(argv)
    subsets = args.subsets.split(',')
    unknown = set(subsets) - set(AVSS_FRAMES)
    if unknown:
        p.error(f"--subsets: unknown {sorted(unknown)}; choose from {', '.join(AVSS_FRAMES)}")
    jobs = clip_jobs(args.layout, args.root, args.labels, subsets)
    if not jobs:
        raise ValueError(f"{args.root}: no clips in the metadata" + (f" of subsets {args.subsets}"
                                                                     if args.layout == 'avss' else ''))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for order, job in enumerate(jobs):
        job.update(order=order, out=str(out), frame_offset=args.frame_offset)
    results = sorted(parallel_map(prepare_clip, jobs, args.workers, f'avsbench {args.layout}'),
                     key=lambda r: r[0])
    columns = ['image', 'audio', 'mask', 'start', 'key'] + list(jobs[0]['extra'])
    written = {}
    for split in dict.fromkeys(job['split'] for job in jobs):  # in the metadata's order
        written[split] = [row for _, s, rows, _ in results if s == split for row in rows]
        write_csv(out / f'{split}.csv', written[split], columns)
    left = [row for _, _, _, rows in results for row in rows]
    write_csv(out / 'left_out.csv', left, REPORT_COLUMNS)
    classes = write_classes(args.root, out) if args.layout == 'avss' else None
    print(', '.join(f"{split}: {len(rows)} frames" for split, rows in written.items())
          + f"; left out {len(left)} of {sum(len(r) for r in written.values()) + len(left)}" + count_reasons(left)
          + f"; manifests and left_out.csv in {out}"
          + (f"; {len(classes) - 1} classes (--seg_classes {len(classes) - 1}) in classes.csv" if classes else ''))
    return written


if __name__ == '__main__':
    main()
