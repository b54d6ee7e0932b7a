"""Prepare the Flickr-SoundNet localization test set (the 250 annotated clips of Senocak et al., CVPR 2018, as
LVS, EZ-VSL and DeepAVFusion evaluate on it) for --task localize --loc_gt consensus.

    python prepare/flickr.py --root Flickr-SoundNet --out OUT [--list flickr_test.csv] [--size 224]

ROOT holds frames/{id}.jpg, audio/{id}.wav and Annotations/{id}.xml (several annotators' boxes per clip); --list
is the official list of clip ids (flickr_test.csv, the id in the first column, no header; default: every
Annotations/*.xml). Each clip's frame is resized to --size x --size and its boxes become the annotators'
consensus map of the same size: each box adds 1 to the pixels it covers, the count is halved and capped at 1, so
a pixel inside one box is 0.5 and inside two or more is 1 (stored as 0, 128, 255; finetune.py --loc_gt consensus
reads value / 255). The boxes are drawn on a 256 x 256 frame and scaled by x * size // 256, as the official code
does (DeepAVFusion datasets.py flickr_anno_parser; LVS test.py); with the default --size 224 the map is theirs,
pixel for pixel. The audio stays where it is (its 3 s window is the middle of the file, as the official loader
takes it: ImageAudioDataset.get_avdata).

Writes OUT/frames/{id}.png, OUT/masks/{id}.png, OUT/test.csv (image, audio, mask, key) and OUT/left_out.csv (every
clip left out and why: missing file, unreadable, no boxes). A second run keeps what an earlier one wrote.
"""
import argparse
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `python prepare/flickr.py`
from media import audio_info  # noqa: E402
from extract import (REPORT_COLUMNS, count_reasons, list_rows, parallel_map, relative, save_image,  # noqa: E402
                     write_csv)

ANNOTATED_SIZE = 256  # the frame size the annotators drew their boxes on (the official parsers scale by x/256)
CONSENSUS_PNG = np.array([0, 128, 255], np.uint8)  # stored value for 0, 1, 2+ boxes: value / 255 is 0, 0.5, 1


def read_boxes(path):
    """The annotators' boxes of one annotation file, [(xmin, ymin, xmax, ymax)] on the 256 x 256 frame: the
    'bbox' elements two levels below the root, each read as its children after the first, in order, as the
    official parsers do (DeepAVFusion datasets.py flickr_anno_parser: `bb[1:]`). Raises ValueError naming the
    file and the box on anything else."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not an XML file ({e})") from None
    boxes = []
    for n, bbox in enumerate((node for field in root for node in field if node.tag == 'bbox'), 1):
        children = list(bbox)[1:]
        named = [c.tag for c in children]
        if len(children) != 4 or (set(named) & {'xmin', 'ymin', 'xmax', 'ymax'}
                                  and named != ['xmin', 'ymin', 'xmax', 'ymax']):
            raise ValueError(f"{path}, box {n}: expected a first child then xmin, ymin, xmax, ymax, got "
                             f"{[c.tag for c in bbox]}")
        try:
            x0, y0, x1, y1 = (int(c.text) for c in children)
        except (TypeError, ValueError):
            raise ValueError(f"{path}, box {n}: coordinates {[c.text for c in children]} are not integers") from None
        boxes.append((x0, y0, x1, y1))
    return boxes


def consensus_map(boxes, size=224):
    """(size, size) float map of the annotators' consensus: every box (on the 256 x 256 frame, scaled by
    x * size // 256, its end exclusive) adds 1 where it covers, then the count is halved and capped at 1
    (DeepAVFusion datasets.py flickr_anno_parser: loc_map / 2 clipped to [0, 1])."""
    counts = np.zeros((size, size), np.int64)
    for box in boxes:
        x0, y0, x1, y1 = (v * size // ANNOTATED_SIZE for v in box)  # integer scaling, as the official code
        counts[y0:y1, x0:x1] += 1
    return np.minimum(counts / 2, 1.0)


def consensus_png(boxes, size=224):
    """The consensus map as the PNG values the manifests' masks hold: 0, 128, 255 for 0, 0.5, 1."""
    return CONSENSUS_PNG[np.round(consensus_map(boxes, size) * 2).astype(np.int64)]


def read_list(path):
    """Clip ids from the first column of flickr_test.csv (no header)."""
    ids = []
    for where, row in list_rows(path):
        if not row[0].strip().isalnum():
            raise ValueError(f"{where}: {row[0]!r} is not a clip id (flickr_test.csv: id,time)")
        ids.append(row[0].strip())
    return ids


def prepare_clip(job):
    """One clip: (its position in the list, manifest row or None, report row or None)."""
    root, out, vid, size = Path(job['root']), Path(job['out']), job['key'], job['size']
    frame, audio = root / 'frames' / f'{vid}.jpg', root / 'audio' / f'{vid}.wav'
    anno = root / 'Annotations' / f'{vid}.xml'

    def leave(file, reason):
        return job['order'], None, {'key': vid, 'split': 'test', 'file': str(file), 'reason': reason}

    for file in (frame, audio, anno):
        if not file.is_file():
            return leave(file, 'missing file')
    try:
        audio_info(audio)
    except ValueError as e:
        return leave(audio, f"unreadable ({str(e).replace(str(audio) + ': ', '')})")
    try:
        boxes = read_boxes(anno)
    except ValueError as e:
        return leave(anno, f"unreadable ({str(e).replace(str(anno), '').lstrip(':, ')})")
    if not boxes:
        return leave(anno, 'no boxes')
    image, mask = out / 'frames' / f'{vid}.png', out / 'masks' / f'{vid}.png'
    if not image.is_file():
        try:
            with Image.open(frame) as im:
                # The map covers the whole square frame: squash the frame to it, as EZ-VSL's test transform
                # does (datasets.py get_test_dataset: Resize((224, 224))).
                picture = im.convert('RGB').resize((size, size), Image.BICUBIC)
        except Exception as e:
            return leave(frame, f"unreadable ({type(e).__name__}: {e})")
        save_image(picture, image)
    if not mask.is_file():
        save_image(Image.fromarray(consensus_png(boxes, size), 'L'), mask)
    return job['order'], {'image': relative(image, out), 'audio': relative(audio, out),
                          'mask': relative(mask, out), 'key': vid}, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--root', required=True, help='folder with frames/, audio/ and Annotations/')
    p.add_argument('--out', required=True, help='output folder: frames/, masks/, test.csv, left_out.csv')
    p.add_argument('--list', default='', help='clip ids, the first column of a CSV without header '
                                              '(flickr_test.csv; default: every Annotations/*.xml)')
    p.add_argument('--size', type=int, default=224, help='side of the square frame and map (default: 224, as '
                                                         'the official map)')
    p.add_argument('--workers', type=int, default=4, help='processes writing frames and maps (default: 4)')
    args = p.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    ids = read_list(args.list) if args.list else sorted(f.stem for f in (root / 'Annotations').glob('*.xml'))
    if not ids:
        raise ValueError(f"{args.list or root / 'Annotations'}: no clips")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [dict(key=vid, order=i, root=str(root), out=str(out), size=args.size) for i, vid in enumerate(ids)]
    results = sorted(parallel_map(prepare_clip, jobs, args.workers, 'flickr'), key=lambda r: r[0])
    rows = [row for _, row, _ in results if row]
    left = [report for _, _, report in results if report]
    write_csv(out / 'test.csv', rows, ['image', 'audio', 'mask', 'key'])
    write_csv(out / 'left_out.csv', left, REPORT_COLUMNS)
    print(f"test: {len(rows)} clips; left out {len(left)} of {len(ids)}" + count_reasons(left)
          + f"; test.csv and left_out.csv in {out}")
    return rows


if __name__ == '__main__':
    main()
