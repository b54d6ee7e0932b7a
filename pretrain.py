"""Self-supervised pre-training of DeepAVFusion with the audio-visual MAE (paper Sec. 3.2 and 4.1).

    python pretrain.py                          # tiny model on synthetic data: a few minutes on a laptop CPU
    torchrun --nproc_per_node=8 pretrain.py --data vggsound_train.csv \
        --image_init mae_pretrain_vit_base.pth --audio_init audiomae_vitb.pth   # the paper's run (ViT-B)

One process runs as is; under torchrun each process takes a shard of every batch (DDP: NCCL on GPUs, Gloo on
CPU). Every random choice for a clip, masking included, comes from (seed, epoch, clip index), so the result does
not depend on the number of processes or workers, and `--resume` continues a run exactly.

This file also holds the training machinery that finetune.py reuses: distributed set-up, the resumable sampler,
the learning-rate schedule, AdamW groups, atomic checkpoints and the training loop (`fit`), and the loss plot.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from data import build_dataset, clip_generator, denormalize
from mae import AVMAE, paste_prediction, random_masking
from model import PRESETS, DeepAVFusion, get_config

# Flags of one session rather than of the run: a resumed run takes these from its own command line (defaults
# included) and every other flag from the checkpoint.
SESSION_FLAGS = {'resume', 'max_steps', 'num_workers', 'output_dir', 'device', 'skip_bad'}


# ---------------------------------------------------------------------------------------------------- flags

def add_encoder_flags(p):
    """Flags for the encoder's shape, shared with finetune.py: a preset and any DeepAVFusionConfig field."""
    p.add_argument('--preset', choices=sorted(PRESETS), help="encoder preset (default: 'base', or 'tiny' on "
                                                               "the synthetic data)")
    p.add_argument('--image_size', type=int, help='image side (preset: base 224, tiny 96)')
    p.add_argument('--embed_dim', type=int)
    p.add_argument('--depth', type=int)
    p.add_argument('--num_heads', type=int)
    p.add_argument('--fusion', choices=['factorized', 'dense', 'token', 'none'])
    p.add_argument('--fusion_layers', help="'all', 'none', or layer indices joined by '-' (e.g. 9-10-11)")
    p.add_argument('--num_fusion_tokens', type=int)
    p.add_argument('--num_aggr_image_tokens', type=int)
    p.add_argument('--num_aggr_audio_tokens', type=int)
    p.add_argument('--fusion_mlp_ratio', type=float)
    p.add_argument('--fusion_attn_ratio', type=float)
    p.add_argument('--fusion_num_heads', type=int)
    p.add_argument('--drop_path', type=float)
    p.add_argument('--literal', action='store_true', help='literal O(n_a n_v) pair form (same function, slower)')


def add_training_flags(p, epochs, warmup_epochs, batch_size, blr, weight_decay):
    """Flags of the training loop, shared with finetune.py (defaults differ per script)."""
    p.add_argument('--data', default='synthetic', help="a manifest CSV (GUIDE.md section 4), or 'synthetic'")
    p.add_argument('--synthetic_clips', type=int, default=1536, help='training clips of the synthetic data')
    p.add_argument('--synthetic_classes', type=int, default=8)
    p.add_argument('--epochs', type=int, default=epochs)
    p.add_argument('--warmup_epochs', type=float, default=warmup_epochs)
    p.add_argument('--max_steps', type=int, default=0, help='stop after this many optimizer steps (0: no limit)')
    p.add_argument('--batch_size', type=int, default=batch_size, help='per process')
    p.add_argument('--accum_iter', type=int, default=1, help='micro-batches per optimizer step')
    p.add_argument('--blr', type=float, default=blr, help='base learning rate: lr = blr * effective batch / 256')
    p.add_argument('--lr', type=float, default=None, help='absolute learning rate (overrides --blr)')
    p.add_argument('--min_lr', type=float, default=0.0)
    p.add_argument('--weight_decay', type=float, default=weight_decay)
    p.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default=None,
                   help='mixed precision (default: bf16 on GPU, none on CPU)')
    p.add_argument('--device', default=None, help="default: 'cuda' if available, else 'cpu'")
    p.add_argument('--num_workers', type=int, default=2)
    p.add_argument('--skip_bad', action='store_true', help='skip clips that fail to decode (counted, reported)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--output_dir', default='output')
    p.add_argument('--resume', default='', help='checkpoint (or its folder) of a run to continue')
    p.add_argument('--log_interval', type=int, default=10, help='optimizer steps between log lines')
    p.add_argument('--weights_only', action=argparse.BooleanOptionalAction, default=True,
                   help='load external checkpoints with torch.load(weights_only=True)')


def get_parser():
    """The flags of pre-training."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_flags(p)
    add_training_flags(p, epochs=200, warmup_epochs=40, batch_size=64, blr=1.5e-4, weight_decay=0.05)
    p.add_argument('--image_mask_ratio', type=float, default=0.75)
    p.add_argument('--audio_mask_ratio', type=float, default=0.8)
    p.add_argument('--decoder_dim', type=int, default=None, help='default 512 (128 on the synthetic data)')
    p.add_argument('--decoder_depth', type=int, default=None, help='default 8 (2 on the synthetic data)')
    p.add_argument('--decoder_num_heads', type=int, default=None, help='default 16 (4 on the synthetic data)')
    p.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--image_init', default='', help='MAE-format ViT checkpoint for the image branch')
    p.add_argument('--audio_init', default='', help='MAE-format ViT checkpoint (AudioMAE) for the audio branch')
    return p


# Quick defaults on the synthetic data: `python pretrain.py` must finish in minutes on a 2-core CPU.
SYNTHETIC_DEFAULTS = dict(preset='tiny', epochs=3, warmup_epochs=0.5, batch_size=32, blr=5e-3, decoder_dim=128,
                          decoder_depth=2, decoder_num_heads=4)
PAPER_DEFAULTS = dict(preset='base', decoder_dim=512, decoder_depth=8, decoder_num_heads=16)


def parse_args(argv=None, parser_fn=get_parser, synthetic_defaults=SYNTHETIC_DEFAULTS, paper_defaults=PAPER_DEFAULTS):
    """Parse flags; on --resume, restore the run's flags from its checkpoint (session flags excepted);
    fill the defaults that depend on the data (paper's recipe for a manifest, quick one for synthetic)."""
    args = parser_fn().parse_args(argv)
    # Which flags were given: argparse fills a default only where the namespace has no value yet.
    marker = object()
    probe = parser_fn().parse_args(argv, argparse.Namespace(**{k: marker for k in vars(args)}))
    given = {k: v for k, v in vars(probe).items() if v is not marker}
    if args.resume:
        saved = load_checkpoint(args.resume)['args']
        for k, v in saved.items():
            if k in SESSION_FLAGS or not hasattr(args, k):
                continue
            if k in given and given[k] != v:
                print(f"--resume: keeping the run's --{k}={v} (ignoring {given[k]})", file=sys.stderr)
            setattr(args, k, v)
        if 'output_dir' not in given:  # a resumed run goes on writing where it was
            args.output_dir = str(checkpoint_path(args.resume).parent)
        return args
    defaults = synthetic_defaults if args.data == 'synthetic' else paper_defaults
    for k, v in defaults.items():
        if k not in given:
            setattr(args, k, v)
    return args


ENCODER_FLAGS = ['image_size', 'embed_dim', 'depth', 'num_heads', 'fusion', 'fusion_layers', 'num_fusion_tokens',
                 'num_aggr_image_tokens', 'num_aggr_audio_tokens', 'fusion_mlp_ratio', 'fusion_attn_ratio',
                 'fusion_num_heads', 'drop_path']


def encoder_config(args):
    """DeepAVFusionConfig from --preset and the per-field flags."""
    overrides = {f: getattr(args, f) for f in ENCODER_FLAGS if getattr(args, f, None) is not None}
    return get_config(args.preset, separable=not args.literal, **overrides)


# ---------------------------------------------------------------------------------------------------- processes

@dataclass
class Dist:
    """Where this process stands: rank, number of processes, its device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device=None):
    """One process, or the torchrun group (RANK, WORLD_SIZE, LOCAL_RANK set): NCCL on GPUs, Gloo on CPU."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return Dist(0, 1, device)
    local = int(os.environ['LOCAL_RANK'])
    if device.type == 'cuda':
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Dist(dist.get_rank(), world, device)


def all_mean(values, ctx):
    """Mean over processes of a list of floats (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t)
        t /= ctx.world
    return t.tolist()


class ShardedSampler(Sampler):
    """DistributedSampler's order, resumable: the clips are shuffled by (seed, epoch); process r takes every
    world-th one from position r, the remainder that does not divide evenly is dropped. With one process and
    batch B * world, a batch holds exactly the clips of the world processes' batches of size B."""

    def __init__(self, n, rank=0, world=1, seed=0, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """Order of `epoch`, beginning after the first `start` clips of this process's share."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        mine = order[:self.n - self.n % self.world][self.rank::self.world]
        return iter(mine[self.start:].tolist())

    def __len__(self):
        return self.n // self.world - self.start


# ---------------------------------------------------------------------------------------------------- optimisation

def lr_at(step, steps_per_epoch, args):
    """Per-step schedule: linear warm-up for `warmup_epochs`, then half-cosine decay to `min_lr` (MAE)."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ramp_at(step, total_steps):
    """Learning-rate factor of pre-trained branches: 0 -> 1 along a half cosine over the first half of
    training (official code), so new fusion blocks settle before the pre-trained weights move."""
    return 0.5 * (1 - math.cos(math.pi * min(step / max(total_steps / 2, 1), 1.0)))


def param_groups(named_params, weight_decay, ramp_prefixes=(), lr_scale=None):
    """AdamW groups: weight decay on tensors of 2 or more dims (weights, fusion and mask tokens), none on 1-D
    ones (biases, norms); parameters under `ramp_prefixes` follow `ramp_at`; `lr_scale(name)` scales a
    parameter's rate (layer-wise decay in fine-tuning)."""
    groups = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 else 0.0
        ramp = name.startswith(tuple(ramp_prefixes))
        scale = lr_scale(name) if lr_scale else 1.0
        g = groups.setdefault((decay, ramp, scale), {'params': [], 'weight_decay': decay, 'ramp': ramp,
                                                      'lr_scale': scale})
        g['params'].append(p)
    return list(groups.values())


def resolve_lr(args, ctx):
    """The linear scaling rule: lr = blr * (batch per process * accumulation * processes) / 256."""
    eff = args.batch_size * args.accum_iter * ctx.world
    if args.lr is None:
        args.lr = args.blr * eff / 256
    return eff


# ---------------------------------------------------------------------------------------------------- checkpoints

def checkpoint_path(path):
    """A checkpoint file, or OUTPUT_DIR/checkpoint.pt when given a folder."""
    path = Path(path)
    return path / 'checkpoint.pt' if path.is_dir() else path


def load_checkpoint(path):
    """This project's training checkpoint (tensors, numbers and strings only: weights_only=True)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location='cpu', weights_only=True)


def save_checkpoint(state, path):
    """Write atomically: to a temporary file first, then rename, so a crash mid-write keeps the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last checkpoint is left as it was."""


# ---------------------------------------------------------------------------------------------------- the loop

def fit(args, ctx, model, dataset, loss_fn, groups, on_checkpoint=None, find_unused_parameters=False):
    """Train `model` on `dataset` with AdamW, the per-step schedule, AMP, gradient accumulation and DDP.

    loss_fn(model, batch, epoch) -> (loss, {name: scalar tensor}) runs on the (DDP-wrapped) model. Checkpoints
    (OUTPUT_DIR/checkpoint.pt) are written at every epoch's end and at the end; `args.resume` continues from one.
    on_checkpoint(model, step) draws pictures beside each checkpoint. Returns the last logged values.
    """
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sampler = ShardedSampler(len(dataset), ctx.rank, ctx.world, args.seed)
    steps_per_epoch = len(sampler) // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"--data {args.data}: {len(dataset)} clips make no full step of --batch_size "
                         f"{args.batch_size} x --accum_iter {args.accum_iter} x {ctx.world} processes")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == 'fp16')
    step = 0
    if args.resume:
        state = load_checkpoint(args.resume)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(state['rng_cpu'])
        if ctx.device.type == 'cuda' and 'rng_cuda' in state:
            torch.cuda.set_rng_state(state['rng_cuda'])
        step = state['step']
        trim_log(out / 'log.jsonl', step)  # lines written after that checkpoint belong to no run now
        if ctx.main:
            print(f"resumed {checkpoint_path(args.resume)} at step {step} (epoch {step / steps_per_epoch:.2f})")
    net = model
    if ctx.world > 1:
        net = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == 'cuda' else None,
                                      find_unused_parameters=find_unused_parameters)
    amp_dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]

    def state_dict():
        state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                 'step': step, 'epoch': step / steps_per_epoch, 'args': vars(args), 'rng_cpu': torch.get_rng_state()}
        if ctx.device.type == 'cuda':
            state['rng_cuda'] = torch.cuda.get_rng_state()
        return state

    def checkpoint():
        if ctx.main:
            save_checkpoint(state_dict(), out / 'checkpoint.pt')
            plot_log(out / 'log.jsonl', out / 'loss_curve.png')
        if on_checkpoint:
            on_checkpoint(model, step)

    last = {}
    while step < last_step:
        epoch = step // steps_per_epoch
        done_in_epoch = step - epoch * steps_per_epoch
        sampler.set_epoch(epoch, start=done_in_epoch * args.accum_iter * args.batch_size)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                            drop_last=True, pin_memory=ctx.device.type == 'cuda')
        steps_now = min(steps_per_epoch, last_step - epoch * steps_per_epoch) - done_in_epoch
        bar = tqdm(total=steps_per_epoch, initial=done_in_epoch, desc=f"epoch {epoch}", disable=not ctx.main,
                   dynamic_ncols=True, leave=False)
        sums, micro, bad, t0 = {}, 0, 0, time.time()
        net.train()
        for i, batch in enumerate(loader):
            if i == steps_now * args.accum_iter:
                break
            batch = {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            bad += int(batch['bad'].sum()) if 'bad' in batch else 0
            sync = (i + 1) % args.accum_iter == 0
            with net.no_sync() if (ctx.world > 1 and not sync) else contextlib.nullcontext():
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss, logs = loss_fn(net, batch, epoch)
                finite = torch.isfinite(loss.detach()).float()
                if ctx.world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    raise NonFiniteLoss(f"non-finite loss at step {step + 1} (epoch {epoch}): "
                                        + ', '.join(f"{k}={float(v.detach()):.4g}" for k, v in logs.items())
                                        + f"; stopped, the last good checkpoint {out / 'checkpoint.pt'} is kept")
                scaler.scale(loss / args.accum_iter).backward()
            for k, v in {'loss': loss, **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            micro += 1
            if not sync:
                continue
            lr = lr_at(step, steps_per_epoch, args)
            ramp = ramp_at(step, total_steps)
            for g in optimizer.param_groups:
                g['lr'] = lr * g['lr_scale'] * (ramp if g['ramp'] else 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % args.log_interval == 0 or step == last_step or step % steps_per_epoch == 0:
                names = sorted(sums)
                means = all_mean([sums[k] / micro for k in names] + [bad], ctx)
                last = {'step': step, 'epoch': round(step / steps_per_epoch, 4), 'lr': lr,
                        **{k: round(v, 6) for k, v in zip(names, means)},
                        'clips_per_s': round(micro * args.batch_size * ctx.world / (time.time() - t0), 2)}
                if means[-1]:
                    last['bad_clips'] = int(means[-1] * ctx.world)
                if ctx.main:
                    with open(out / 'log.jsonl', 'a') as f:
                        f.write(json.dumps(last) + '\n')
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                    if last.get('bad_clips'):
                        print(f"skipped {last['bad_clips']} clip(s) that failed to decode", file=sys.stderr)
                sums, micro, bad, t0 = {}, 0, 0, time.time()
            if step % steps_per_epoch == 0 or step == last_step:
                checkpoint()
        bar.close()
        if ctx.main and last:
            print(f"epoch {epoch} step {step}: " + ' '.join(f"{k}={v:.4g}" for k, v in last.items()
                                                             if k not in ('step', 'epoch')), flush=True)
    return last


def trim_log(path, step):
    """Drop log lines past `step` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)['step'] <= step]
    path.write_text(''.join(line + '\n' for line in lines))


# ---------------------------------------------------------------------------------------------------- pictures

def plot_log(log_path, png_path, keys=None, title='training loss'):
    """Line plot (PNG) of the logged values against the step: the loss curve."""
    if not Path(log_path).exists():
        return
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    keys = keys or [k for k in ('loss', 'loss_image', 'loss_audio') if rows and k in rows[0]]
    series = {k: [(r['step'], r[k]) for r in rows if k in r] for k in keys}
    line_plot(series, png_path, title, 'optimizer step')


def line_plot(series, path, title, xlabel, size=(720, 420)):
    """A small line chart with PIL: series {name: [(x, y), ...]}, a legend, axis ranges in the corners."""
    W, H, (l, r, t, b) = *size, (70, 20, 40, 50)
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    if not points:
        return
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    px = lambda x: l + (x - x0) / (x1 - x0) * (W - l - r)
    py = lambda y: H - b - (y - y0) / (y1 - y0) * (H - t - b)
    d.rectangle([l, t, W - r, H - b], outline='black')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        y = y0 + frac * (y1 - y0)
        d.line([l - 4, py(y), l, py(y)], fill='black')
        d.text((4, py(y) - 6), f"{y:.4g}", fill='black')
        x = x0 + frac * (x1 - x0)
        d.line([px(x), H - b, px(x), H - b + 4], fill='black')
        d.text((px(x) - 10, H - b + 8), f"{x:.4g}", fill='black')
    d.text((W / 2 - 40, H - 20), xlabel, fill='black')
    d.text((l, 12), title, fill='black')
    colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e']
    for i, (name, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        if len(s) > 1:
            d.line([(px(x), py(y)) for x, y in s], fill=c, width=2)
        else:
            d.ellipse([px(s[0][0]) - 3, py(s[0][1]) - 3, px(s[0][0]) + 3, py(s[0][1]) + 3], fill=c)
        d.text((W - r - 150, t + 8 + 14 * i), f"- {name}", fill=c)
    img.save(path)


def colormap(x, lo=None, hi=None):
    """2-D array -> uint8 RGB with a dark-to-bright (magma-like) map, for spectrograms and heat maps."""
    x = np.asarray(x, dtype=np.float32)
    lo = x.min() if lo is None else lo
    hi = x.max() if hi is None else hi
    v = np.clip((x - lo) / max(hi - lo, 1e-8), 0, 1)
    stops = np.array([[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]], np.float32)
    pos = v * (len(stops) - 1)
    i = np.minimum(pos.astype(int), len(stops) - 2)
    f = (pos - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def save_grid(rows, title, path):
    """PNG of picture rows under a one-line title: each row a list of (H, W, 3) uint8 tiles, each framed by 2 px
    of white and padded at the bottom to the tallest tile."""
    h = max(t.shape[0] for row in rows for t in row)
    pad = lambda t: np.pad(t, ((2, 2 + h - t.shape[0]), (2, 2), (0, 0)), constant_values=255)
    canvas = Image.fromarray(np.concatenate([np.concatenate([pad(t) for t in row], 1) for row in rows], 0))
    out = Image.new('RGB', (canvas.width, canvas.height + 18), 'white')
    ImageDraw.Draw(out).text((4, 3), title, fill='black')
    out.paste(canvas, (0, 18))
    out.save(path)


def save_reconstructions(mae, dataset, path, seed, n=4):
    """PNG: for n clips, image input / masked / reconstruction and spectrogram input / masked / reconstruction.
    The masks are fixed per clip (stream 1 of the clip's generator), so pictures of one run are comparable."""
    mae.eval()
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    device = next(mae.parameters()).device
    image = torch.stack([it['image'] for it in items]).to(device)
    audio = torch.stack([it['audio'] for it in items]).to(device)
    gens = [clip_generator(seed, 0, it['index'], stream=1) for it in items]
    noise_i = torch.stack([torch.rand(mae.encoder.image.num_patches, generator=g) for g in gens]).to(device)
    noise_a = torch.stack([torch.rand(mae.encoder.audio.num_patches, generator=g) for g in gens]).to(device)
    with torch.no_grad():
        _, _, pred_i, pred_a = mae(image, audio, noise_i, noise_a)
    p = mae.patch_size
    rows = [[] for _ in items]  # per clip: the image triplet, a spacer, the spectrogram triplet
    for x, pred, noise, ratio, is_image in ((image, pred_i, noise_i, mae.image_mask_ratio, True),
                                             (audio, pred_a, noise_a, mae.audio_mask_ratio, False)):
        mask = random_masking(noise, ratio)[1]
        recon = paste_prediction(x, pred.float(), mask, p, mae.norm_pix_loss)
        grid = (x.shape[2] // p, x.shape[3] // p)
        hidden = mask.reshape(-1, *grid).repeat_interleave(p, 1).repeat_interleave(p, 2).bool()
        for j in range(len(items)):
            if is_image:
                shown = [denormalize(x[j]), denormalize(x[j]), denormalize(recon[j])]
                shown[1][hidden[j].cpu().numpy()] = 128
                shown.append(np.full((1, 4, 3), 255, np.uint8))  # a gap before the spectrograms
            else:  # low frequencies at the bottom; one colour scale per clip
                spec = x[j, 0].flip(0).cpu().numpy()
                lo, hi = spec.min(), spec.max()
                masked = spec.copy()
                masked[hidden[j].flip(0).cpu().numpy()] = lo
                shown = [colormap(spec, lo, hi), colormap(masked, lo, hi),
                         colormap(recon[j, 0].flip(0).float().cpu().numpy(), lo, hi)]
            rows[j] += shown
    save_grid(rows, "image: input | masked | reconstruction      spectrogram: input | masked | reconstruction", path)
    mae.train()


# ---------------------------------------------------------------------------------------------------- main

def build_mae(args):
    """AVMAE around a fresh encoder (uni-modal branches from MAE/AudioMAE checkpoints when given)."""
    encoder = DeepAVFusion(encoder_config(args))
    if args.image_init:
        encoder.load_unimodal('image', args.image_init, args.weights_only)
    if args.audio_init:
        encoder.load_unimodal('audio', args.audio_init, args.weights_only)
    return AVMAE(encoder, args.decoder_dim, args.decoder_depth, args.decoder_num_heads, args.image_mask_ratio,
                 args.audio_mask_ratio, args.norm_pix_loss)


def masking_noise(batch, num_patches, seed, epoch, device):
    """Per-clip masking noise from (seed, epoch, index): identical whatever the process count."""
    gens = [clip_generator(seed, epoch, int(i), stream=1) for i in batch['index']]
    return [torch.stack([torch.rand(n, generator=g) for g in gens]).to(device) for n in num_patches]


def main(argv=None):
    args = parse_args(argv)
    ctx = setup_distributed(args.device)
    args.device = str(ctx.device)
    args.amp = args.amp or ('bf16' if ctx.device.type == 'cuda' else 'none')
    eff = resolve_lr(args, ctx)
    torch.manual_seed(args.seed)
    mae = build_mae(args).to(ctx.device)
    size = mae.encoder.config.image_hw
    train_set = build_dataset(args.data, size, True, args.seed, 'train', skip_bad=args.skip_bad,
                              synthetic_clips=args.synthetic_clips, synthetic_classes=args.synthetic_classes)
    view_set = build_dataset(args.data, size, False, args.seed, 'val' if args.data == 'synthetic' else 'train',
                             skip_bad=args.skip_bad, synthetic_clips=args.synthetic_clips,
                             synthetic_classes=args.synthetic_classes)
    if ctx.main:
        n_params = sum(p.numel() for p in mae.encoder.parameters())
        print(f"pre-training: {args.preset} encoder ({mae.encoder.config.fusion} fusion, layers "
              f"{mae.encoder.config.fusion_layers}, {n_params / 1e6:.1f}M parameters), data {args.data} "
              f"({len(train_set)} clips), {ctx.world} process(es) on {ctx.device}, amp {args.amp}, "
              f"effective batch {eff}, lr {args.lr:.3g}, {args.epochs} epochs -> {args.output_dir}", flush=True)
    ramp = [p for p, init in (('encoder.image.', args.image_init), ('encoder.audio.', args.audio_init)) if init]
    groups = param_groups(mae.named_parameters(), args.weight_decay, ramp_prefixes=ramp)
    n_patches = (mae.encoder.image.num_patches, mae.encoder.audio.num_patches)

    def loss_fn(net, batch, epoch):
        noise_i, noise_a = masking_noise(batch, n_patches, args.seed, epoch, ctx.device)
        loss_image, loss_audio, _, _ = net(batch['image'], batch['audio'], noise_i, noise_a)
        return loss_image + loss_audio, {'loss_image': loss_image, 'loss_audio': loss_audio}  # Eq. 16

    def on_checkpoint(model, step):
        if ctx.main:
            save_reconstructions(model, view_set, Path(args.output_dir) / 'reconstructions.png', args.seed)

    try:
        last = fit(args, ctx, mae, train_set, loss_fn, groups, on_checkpoint=on_checkpoint)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if ctx.main:
        print(f"done: step {last.get('step')}, loss {last.get('loss')}; wrote {args.output_dir}/checkpoint.pt, "
              f"log.jsonl, loss_curve.png, reconstructions.png")
    return last


if __name__ == '__main__':
    main()
