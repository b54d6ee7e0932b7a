"""What every preparation script does to a clip: find its file among the downloaded videos, check it, cut a few
frames and its 16 kHz mono audio, in parallel and resumably, and report every clip it left out and why.

A prepared clip is a folder OUT/clips/<key>/ with frames/000.jpg, 001.jpg, ... taken at (k + 0.5) / fps seconds
(frame k covers [k, k + 1) / fps, the manifest's `fps` column) and audio.wav (16 kHz, mono, 16-bit). It is
written under a temporary name and renamed when complete, so a folder that exists is a finished clip: a second
run skips it (resumption) and retries only the clips that are missing or were left out.

Reasons a clip is left out (the report's `reason` column): missing file, unreadable (not a video, no video track,
no audio track), undecodable (fails while decoding), shorter than --min_seconds, silent (peak below
SILENCE_DBFS).
"""
import csv
import multiprocessing as mp
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torchaudio
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root: `python prepare/<name>.py`
from data import SAMPLE_RATE  # noqa: E402
from media import VIDEO_EXTENSIONS, Video, write_audio  # noqa: E402

SILENCE_DBFS = -60.0  # a clip whose loudest sample is below this (0.001 of full scale) is silent
REPORT_COLUMNS = ['key', 'split', 'file', 'reason']


# ---------------------------------------------------------------------------------------------------- finding files

# <11-character YouTube id>_<start>[_<end>].<ext>, the names of the common downloads:
# ---g-f_I2yQ_000001.mp4 (VGGSound, start in whole seconds), --4gqARaEJE_0.000.mp4 or ..._30.000_40.000.mkv
# (AudioSet, start and end in seconds).
YOUTUBE_NAME = re.compile(r'^(?P<id>[A-Za-z0-9_-]{11})_(?P<start>\d+(?:\.\d+)?)(?:_(?P<end>\d+(?:\.\d+)?))?$')


def index_videos(folder):
    """{(youtube id, start in whole seconds): path} for the videos under `folder` (searched recursively) whose
    names follow YOUTUBE_NAME, and {youtube id: [paths]} for files named by the id alone."""
    by_start, by_id = {}, {}
    for path in sorted(Path(folder).rglob('*')):
        if path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
            continue
        m = YOUTUBE_NAME.match(path.stem)
        if m:
            by_start.setdefault((m['id'], int(round(float(m['start'])))), path)
        elif re.fullmatch(r'[A-Za-z0-9_-]{11}', path.stem):
            by_id.setdefault(path.stem, []).append(path)
    return by_start, by_id


def find_video(folder, index, ytid, start, name_pattern=None, end=None):
    """The file of clip (ytid, start[, end]): by --name_pattern (a path under `folder` with {id}, {start}, {end}
    fields, e.g. '{id}_{start:06d}.mp4'; end defaults to start + 10 s), else by the names the common downloads
    use; None if absent."""
    if name_pattern:
        end = start + 10 if end is None else end
        whole = [int(t) if float(t).is_integer() else t for t in (start, end)]  # so that both {start:06d} and
        path = Path(folder) / name_pattern.format(id=ytid, start=whole[0], end=whole[1])  # {start:.3f} work
        return path if path.is_file() else None
    by_start, by_id = index
    found = by_start.get((ytid, int(round(start))))
    if found is None and len(by_id.get(ytid, [])) == 1:  # named by the id alone: the one file of that video
        found = by_id[ytid][0]
    return found


# ---------------------------------------------------------------------------------------------------- one clip

def prepare_clip(job):
    """Cut one clip: job = dict(key, video (path or None), out (the OUT folder), fps, short_side, min_seconds,
    and any fields passed through). Returns (job, None) when the clip is ready, (job, reason) when left out."""
    final = Path(job['out']) / 'clips' / job['key']
    if final.is_dir():
        return job, None  # finished by an earlier run
    if job.get('video') is None:
        return job, 'missing file'
    tmp = final.with_name(final.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        reason = cut(job, tmp)
    except Exception as e:  # anything the decoder raises on a broken file
        reason = f"undecodable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if reason:
        shutil.rmtree(tmp, ignore_errors=True)
        return job, reason
    tmp.rename(final)
    return job, None


def cut(job, folder):
    """Write folder/audio.wav and folder/frames/*.jpg for the video of `job`; a reason to leave it out, or None."""
    try:
        video = Video(job['video'])
    except ValueError as e:
        return f"unreadable ({str(e).replace(str(job['video']) + ': ', '')})"
    with video:
        waveform, rate = video.audio()
        duration = waveform.shape[1] / rate
        if duration < job['min_seconds']:
            return f"shorter than {job['min_seconds']:g} s ({duration:.2f} s)"
        x = torch.from_numpy(waveform).mean(0)
        if rate != SAMPLE_RATE:
            x = torchaudio.functional.resample(x, rate, SAMPLE_RATE)
        peak = float(x.abs().max())
        if peak <= 10 ** (SILENCE_DBFS / 20):
            return f"silent (peak {20 * np.log10(max(peak, 1e-12)):.0f} dBFS)"
        (folder / 'frames').mkdir(parents=True)
        write_audio(folder / 'audio.wav', x.numpy())
        times = (np.arange(max(int(duration * job['fps']), 1)) + 0.5) / job['fps']
        for k, image in enumerate(frames_at(video, times)):
            if job['short_side']:
                s = job['short_side'] / min(image.size)
                image = image.resize((max(round(image.width * s), 1), max(round(image.height * s), 1)), 3)
            image.save(folder / 'frames' / f'{k:03d}.jpg', quality=90)
    return None


def frames_at(video, times):
    """The frames shown at `times` (seconds, increasing), decoding the video once from its start."""
    stream = video.vstream
    first = max(float(stream.start_time * stream.time_base), 0.0) if stream.start_time else 0.0
    video.container.seek(0, stream=stream)
    shown, k = None, 0
    for frame in video.container.decode(stream):
        t = float(frame.pts * frame.time_base) - first if frame.pts is not None else 0.0
        while k < len(times) and shown is not None and t > times[k]:
            yield shown.to_image()  # the frame before this one was on screen at times[k]
            k += 1
        if k == len(times):
            return
        shown = frame
    if shown is None:
        raise ValueError("no video frames")
    for _ in range(k, len(times)):  # past the last frame: it stays on screen
        yield shown.to_image()


# ---------------------------------------------------------------------------------------------------- many clips

def run(jobs, workers, desc):
    """prepare_clip over jobs with a progress bar, in `workers` processes (0 or 1: in this one); results in any
    order."""
    return parallel_map(prepare_clip, jobs, workers, desc)


def parallel_map(fn, jobs, workers, desc):
    """fn over jobs with a progress bar, in `workers` processes (0 or 1: in this one); results in any order. `fn`
    must be a module-level function (the processes are spawned, not forked, so they share no state)."""
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, dynamic_ncols=True)]
    with mp.get_context('spawn').Pool(workers) as pool:
        return list(tqdm(pool.imap_unordered(fn, jobs, chunksize=4), total=len(jobs), desc=desc,
                         dynamic_ncols=True))


def manifest_row(job):
    """The manifest row of a prepared clip: its frame folder and frame rate, its audio, its label, its key."""
    base = f"clips/{job['key']}"
    return {'image': f'{base}/frames', 'fps': f"{job['fps']:g}", 'audio': f'{base}/audio.wav',
            'label': job['label'], 'key': job['key']}


def list_rows(path):
    """The non-blank rows of a list file without a header (the datasets' own CSVs), as (where, cells): `where`
    names the file and line for error messages."""
    with open(path, newline='') as f:
        for n, row in enumerate(csv.reader(f), 1):
            if row and row[0].strip():
                yield f"{path}, line {n}", row


def write_csv(path, rows, columns):
    """A CSV file with a header (written anew)."""
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, columns, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


def finish(results, out, splits, extra_left=()):
    """Write OUT/<split>.csv for each split (rows in the order of the dataset's list) and OUT/left_out.csv, and
    print the counts. `results` are prepare_clip's; each job has 'order' (its position in the list) and 'split'.
    `extra_left`: more report rows (REPORT_COLUMNS) to list and count, e.g. evaluation pairs that lost a clip.
    Returns {split: rows}."""
    results = sorted(results, key=lambda r: r[0]['order'])
    Path(out).mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        rows = [manifest_row(job) for job, reason in results if reason is None and job['split'] == split]
        write_csv(Path(out) / f'{split}.csv', rows, ['image', 'fps', 'audio', 'label', 'key'])
        written[split] = rows
    left = [{'key': job['key'], 'split': job['split'], 'file': str(job['video'] or ''), 'reason': reason}
            for job, reason in results if reason is not None]
    write_csv(Path(out) / 'left_out.csv', left + list(extra_left), REPORT_COLUMNS)
    print(', '.join(f"{split}: {len(rows)} clips" for split, rows in written.items())
          + f"; left out {len(left)} of {len(results)}" + count_reasons(left + list(extra_left))
          + f"; manifests and left_out.csv in {out}")
    return written


def count_reasons(left):
    """' (missing file: 2, silent: 1)': report rows counted by the kind of their reason (its text before ' ('),
    for the summary line; '' when there are none."""
    counts = {}
    for row in left:
        kind = row['reason'].split(' (')[0]
        counts[kind] = counts.get(kind, 0) + 1
    return f" ({', '.join(f'{k}: {n}' for k, n in counts.items())})" if counts else ''


def relative(path, out):
    """`path` as a manifest in folder `out` names it: relative to `out` (manifest paths are relative to the CSV's
    folder), with '/' separators. Scripts whose sources are already frames and audio files point at them in place
    rather than copying them."""
    return Path(os.path.relpath(Path(path).resolve(), Path(out).resolve())).as_posix()


def save_image(image, path):
    """Save a PIL image under a temporary name, then rename it: a file that exists is complete, so a second run
    can skip it (resumption)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + '.tmp' + path.suffix)
    image.save(tmp)
    tmp.replace(path)


def add_common_flags(p):
    """The flags every video preparation script shares."""
    p.add_argument('--videos', required=True, help='folder of downloaded clips (searched recursively)')
    p.add_argument('--out', required=True, help='output folder: clips/, <split>.csv manifests, left_out.csv')
    p.add_argument('--name_pattern', default='', help="file of a clip under --videos, with {id}, {start} and {end} "
                                                      "fields, e.g. '{id}_{start:06d}.mp4' (default: the names "
                                                      "the common downloads use, found by id and start)")
    p.add_argument('--workers', type=int, default=4, help='processes cutting clips in parallel (default: 4)')
    p.add_argument('--fps', type=float, default=1.0, help='frames kept per second of video (default: 1)')
    p.add_argument('--short_side', type=int, default=256, help='frames resized to this short side in pixels, 0 '
                                                               'keeps them as they are (default: 256)')
    p.add_argument('--min_seconds', type=float, default=1.0, help='clips with less audio are left out '
                                                                  '(default: 1)')
