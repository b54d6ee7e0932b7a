"""What pre-training and fine-tuning share: flags, processes, sampler, schedule, optimizers, checkpoints, `fit`."""
# Top to bottom: recipes and flags, processes (one, or a torchrun group), the sampler, the schedule, optimizers,
# checkpoints, log, `fit`.
#
# Checkpoints are atomic, the previous one kept; --resume continues the same run exactly, at any step; --resume auto
# lets torchrun --max-restarts restart a group with the same command.
#
# Every random choice for a clip comes from (seed, epoch, clip index) (data.clip_generator), so the result does not
# depend on the number of processes or loader workers, and a resumed run sees what the uninterrupted one saw.
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from audiovisual_mae import ENCODERS, AudiovisualMAEEncoder
from cavmae import CAVMAEEncoder
from data import collate
from checkpoints import read_checkpoint, readable
from model import PRESETS, DeepAVFusion, DeepAVFusionConfig

# Flags of one session rather than of the run: a resumed run takes these from its own command line (defaults
# included) and every other flag from its checkpoint.
SESSION_FLAGS = {'resume', 'max_steps', 'num_workers', 'output_dir', 'device', 'skip_bad', 'compile',
                 'device_frontend', 'print_recipe', 'save_every'}
JOINT_LAYERS = {'cavmae': 1, 'avmae': 2}  # CAV-MAE's one joint layer; Audiovisual MAE's mid-fusion S = 2 (its Table 13)
AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


# ---------------------------------------------------------------------------------------------------- recipes

def encoder_fields():
    """The DeepAVFusionConfig fields that are flags: those with a help text (the audio front-end fixes audio_size)."""
    return [f for f in dataclasses.fields(DeepAVFusionConfig) if 'help' in f.metadata]


def add_recipe_flag(p, name, type, help, recipes, choices=None):
    """A flag whose default comes from the recipe: --help lists its value in each column of `recipes` ({column:
    {flag: value}}), columns with the same value together; '-' for a value the recipe leaves unset (None)."""
    shown = {}
    for column, recipe in recipes.items():
        if name in recipe:
            shown.setdefault('-' if recipe[name] is None else str(recipe[name]), []).append(column)
    values = '; '.join(f"{', '.join(columns)}: {value}" for value, columns in shown.items())
    kind = dict(action=argparse.BooleanOptionalAction) if type is bool else dict(type=type, choices=choices)
    p.add_argument(f'--{name}', default=None, help=f"{help} ({values})" if values else help, **kind)


def add_encoder_flags(p, recipes=None):
    """--preset, --print_recipe, and a flag per DeepAVFusionConfig field, defaulting to its preset's value, or to
    that of `recipes` ({column: {flag: value}}, columns named '... <preset>') where they hold it (e.g. drop_path)."""
    g = p.add_argument_group('preset and encoder shape (defaults per preset: model.PRESETS)')
    g.add_argument('--preset', default='tiny', choices=sorted(PRESETS),
                   help="the whole recipe: 'tiny' (CPU scale; default) or 'base' (the paper's ViT-B, Sec. 4.1)")
    g.add_argument('--print_recipe', action='store_true', help="print every flag's value and its source, and exit")
    g.add_argument('--system', default='deepavfusion', choices=['deepavfusion', 'cavmae', 'avmae'],
                   help="the encoder: DeepAVFusion (default), CAV-MAE's or Audiovisual MAE's (docs/systems.md); "
                        "pretrain.py sets each one's recipe (pretrain.SYSTEMS, fusion none for the two others)")
    g.add_argument('--joint_layers', type=int, default=None,
                   help=f"joint layers of the L (default: {', '.join(f'{k} {v}' for k, v in JOINT_LAYERS.items())})")
    g.add_argument('--avmae_encoder', default='mid', choices=ENCODERS, help="avmae: Sec. 3.2 (default: mid)")
    g.add_argument('--image_init', default='', help='MAE-format ViT checkpoint for the image branch (MAE)')
    g.add_argument('--audio_init', default='', help='MAE-format ViT checkpoint for the audio branch (AudioMAE)')
    g.add_argument('--audio_init_layout', default='auto', choices=['auto', 'as_is'],
                   help="auto (default): an AudioMAE kernel is transposed to this project's (frequency, time) "
                        "patches; as_is: loaded as stored, as the official DeepAVFusion does (docs/systems.md)")
    shapes = {name: dataclasses.asdict(config) for name, config in PRESETS.items()}
    for f in encoder_fields():
        columns = ({c: {f.name: r.get(f.name, shapes[c.split()[-1]][f.name])} for c, r in recipes.items()}
                   if recipes and any(f.name in r for r in recipes.values()) else shapes)
        add_recipe_flag(g, f.name, type(f.default), f.metadata['help'], columns, f.metadata['choices'])


def add_training_flags(p, recipes):
    """Flags of the data, the loop and the session; `recipes` ({column: {flag: value}}) gives the loop's defaults."""
    g = p.add_argument_group('data')
    g.add_argument('--data', default='synthetic', help="a manifest CSV (README, 'Your data'), a video or a folder of "
                                                       "them, or 'synthetic' (default: shapes and tones)")
    g.add_argument('--synthetic_clips', type=int, default=1536, help='synthetic training clips (default: 1536)')
    g.add_argument('--synthetic_classes', type=int, default=8, help='synthetic classes (default: 8)')
    g.add_argument('--speed_perturb', type=float, default=0.0, help='training audio at a random speed in [1 - s, '
                                                                   '1 + s], for speech (default: 0, off)')
    g.add_argument('--skip_bad', action='store_true', help='leave out (and list in OUTPUT_DIR/left_out.csv) clips '
                                                           'that fail the checks or fail to decode, not stop')
    g = p.add_argument_group('training (defaults per preset)')
    add_recipe_flag(g, 'epochs', int, 'length of the run in epochs', recipes)
    add_recipe_flag(g, 'warmup_epochs', float, 'linear warm-up, in epochs, before the cosine decay', recipes)
    add_recipe_flag(g, 'batch_size', int, 'clips per process and micro-batch', recipes)
    add_recipe_flag(g, 'blr', float, 'base learning rate: lr = blr * effective batch / 256', recipes)
    add_recipe_flag(g, 'lr', float, "absolute learning rate (overrides --blr; '-': from --blr)", recipes)
    add_recipe_flag(g, 'weight_decay', float, 'weight decay of weights (not of biases and norms)', recipes)
    g.add_argument('--min_lr', type=float, default=0.0, help='learning rate at the end of the cosine (default: 0)')
    g.add_argument('--accum_iter', type=int, default=1, help='micro-batches per optimizer step (default: 1)')
    g.add_argument('--max_steps', type=int, default=0, help='stop after this many steps, the schedule unchanged '
                                                            '(default: 0, no limit)')
    g.add_argument('--amp', choices=sorted(AMP_DTYPES), help='mixed precision (default: bf16 on a GPU, none on a CPU)')
    g.add_argument('--compile', action='store_true', help='torch.compile the model in place at the first step '
                                                          '(default: off, eager; on a CPU it needs g++)')
    g.add_argument('--seed', type=int, default=0, help='(default: 0)')
    g = p.add_argument_group('session and output')
    g.add_argument('--device', default=None, help="default: 'cuda' if available, else 'cpu'")
    g.add_argument('--num_workers', type=int, default=2, help='data loader processes (default: 2)')
    g.add_argument('--output_dir', default='output', help='(default: output)')
    g.add_argument('--resume', default='', help="checkpoint (or its folder) of a run to continue; 'auto': "
                   "--output_dir's if it has one (the previous one if the newest cannot be read), else a new run: "
                   "the same command starts and continues a run, as torchrun --max-restarts needs (default: none)")
    g.add_argument('--save_every', type=int, default=0, help='also checkpoint every N optimizer steps within an '
                   'epoch, for long epochs (default: 0, at the end of each epoch and of the run only)')
    g.add_argument('--log_interval', type=int, default=10, help='optimizer steps between log lines (default: 10)')
    g.add_argument('--weights_only', action=argparse.BooleanOptionalAction, default=True,
                   help='read external checkpoints with torch.load(weights_only=True) (default: on)')


def parse_flags(parser, argv, recipe, validate=None):
    """Parse `argv`; each flag's value comes from, first to last: the command line; on --resume, the resumed run
    (but SESSION_FLAGS); `recipe(args)` -> [(where, {flag: value})] over model.PRESETS; else argparse's default."""
    args = parser.parse_args(argv)
    if args.resume == 'auto':
        args.resume = auto_resume(Path(args.output_dir))
    marker = object()  # which flags were given: argparse fills a default only where the namespace has no value
    probe = parser.parse_args(argv, argparse.Namespace(**{k: marker for k in vars(args)}))
    given = {k: v for k, v in vars(probe).items() if v is not marker}
    source = {k: 'command line' for k in given}
    saved = load_checkpoint(args.resume)['args'] if args.resume else {}
    resumed = {k: v for k, v in saved.items() if k not in SESSION_FLAGS and hasattr(args, k)}
    if args.resume and 'output_dir' not in given:  # a resumed run goes on writing where it was
        resumed['output_dir'] = str(checkpoint_path(args.resume).parent)
    for k, v in resumed.items():
        if k in given and given[k] != v:
            print(f"--resume: keeping the run's --{k}={v} (ignoring {given[k]})", file=sys.stderr)
        setattr(args, k, v)
        source[k] = f"the resumed run ({checkpoint_path(args.resume)})"
    layers = [] if args.resume else [(f"model.PRESETS[{args.preset!r}]", dataclasses.asdict(PRESETS[args.preset]))]
    layers += recipe(args)  # of the resumed run's task, preset and recipe; flags newer than its checkpoint take it
    defaults = {k: (where, v) for where, values in layers for k, v in values.items()}  # a later layer wins
    if 'blr' in given:  # an explicit base rate wins over a recipe's absolute one
        defaults.pop('lr', None)
    for k, (where, v) in defaults.items():
        if k not in saved and getattr(args, k, marker) is None:
            setattr(args, k, v)
            source[k] = where
    if not args.resume and args.warmup_epochs and args.warmup_epochs >= args.epochs:
        parser.error(f"--warmup_epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the "
                     f"learning rate would never leave its warm-up. Shorten the warm-up or lengthen the run.")
    # `validate(args)` then refuses what does not go together; --print_recipe prints each value with where it came
    # from, and exits.
    if validate:
        validate(args)
    if args.print_recipe:
        print_recipe(args, source)
    return args


def print_recipe(args, source):
    """--print_recipe: every flag's value and where it came from; then the program exits."""
    source = {'lr': 'lr = blr x effective batch / 256' if args.lr is None else None, 'device': 'chosen at start',
              'amp': 'chosen at start (bf16 on a GPU)', **{k: v for k, v in source.items() if v}}
    width = max(map(len, vars(args)))
    print('\n'.join(f"--{k:<{width}}  {'-' if v is None else v!s:<24}  {source.get(k) or 'default (argparse)'}"
                    for k, v in vars(args).items() if k != 'print_recipe'))
    if getattr(args, 'init', 'none') != 'none':
        print(f"(--init {args.init}: a checkpoint of this project replaces the encoder's shape by its own)")
    raise SystemExit(0)


def encoder_config(args):
    """DeepAVFusionConfig from the flags (every field is one)."""
    return DeepAVFusionConfig(**{f.name: getattr(args, f.name) for f in encoder_fields()})


def make_encoder(args):
    """The encoder of --system: DeepAVFusion (branches from --image_init / --audio_init, MAE-format ViTs), or
    CAV-MAE's / Audiovisual MAE's of its width and depth, with --joint_layers (else JOINT_LAYERS) joint layers."""
    system = getattr(args, 'system', 'deepavfusion')
    joint = JOINT_LAYERS.get(system) if getattr(args, 'joint_layers', None) is None else args.joint_layers
    if system == 'cavmae':
        return CAVMAEEncoder(encoder_config(args), joint)
    if system == 'avmae':
        return AudiovisualMAEEncoder(encoder_config(args), args.avmae_encoder, joint)
    encoder = DeepAVFusion(encoder_config(args))
    for branch, path in (('image', getattr(args, 'image_init', '')), ('audio', getattr(args, 'audio_init', ''))):
        if path:
            layout = getattr(args, 'audio_init_layout', 'auto') if branch == 'audio' else 'auto'
            encoder.load_unimodal(branch, path, args.weights_only, layout=layout)
    return encoder


# ---------------------------------------------------------------------------------------------------- processes

@dataclasses.dataclass
class Dist:
    """Where this process stands: rank, number of processes, device."""
    rank: int
    world: int
    device: torch.device
    main = property(lambda self: self.rank == 0)  # rank 0 writes the files and prints


@contextlib.contextmanager
def processes(args):
    """Set up this process (alone or in a torchrun group): --device, --amp, torch's seed; on exit, end the group."""
    # A NonFiniteLoss ends the program with its message and exit status 1.
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1:
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    ctx = Dist(dist.get_rank() if world > 1 else 0, world, device)
    if ctx.main and int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) and \
            os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':  # measured: 2 of 8 restarts hung or failed
        print("warning: torchrun shares its rendezvous store with the workers, and a restarted group can hang in "
              "init_process_group (pytorch issue 135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",
              file=sys.stderr)
    args.device, args.amp = str(device), args.amp or ('bf16' if device.type == 'cuda' else 'none')
    torch.manual_seed(args.seed)
    try:
        yield ctx
        if dist.is_initialized():
            dist.barrier()
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce(t, ctx, op='sum'):
    """In place over the processes (no-op with one process); 'sum', 'min' or 'max'."""
    if ctx.world > 1:
        dist.all_reduce(t, op={'sum': dist.ReduceOp.SUM, 'min': dist.ReduceOp.MIN, 'max': dist.ReduceOp.MAX}[op])
    return t


def to_device(batch, device):
    """A batch dict with its tensors on `device` (non-blocking: copies from pinned memory overlap compute)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(args, ctx):
    """The autocast context of --amp (bf16, fp16 or none) on this process's device."""
    dtype = AMP_DTYPES[args.amp]
    return torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None)


def report_left_out(datasets, args, ctx):
    """Start OUTPUT_DIR/left_out.csv with the rows the datasets left out at their checks (--skip_bad); returns them."""
    rows = [r for d in datasets for r in getattr(d, 'left_out', [])]
    if ctx.main:
        path = Path(args.output_dir) / 'left_out.csv'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        write_left_out(rows, path)
        if rows:
            print(f"left out {len(rows)} clip(s) that fail the checks (--skip_bad): listed in {path}", flush=True)
    return rows


def write_left_out(rows, path):
    """Append clips left out (a dataset's `left_out` or `skipped`) to a CSV report."""
    if rows:
        new = not Path(path).exists()
        with open(path, 'a', newline='') as f:
            w = csv.DictWriter(f, ['manifest', 'row', 'clip', 'reason'])
            if new:
                w.writeheader()
            w.writerows(rows)


def left_out_report(dataset):
    """The clips a dataset left out (failed checks) or skipped (failed to decode), for metrics.json."""
    rows = getattr(dataset, 'left_out', []) + getattr(dataset, 'skipped', [])
    return {'left_out': rows} if rows else {}


# ---------------------------------------------------------------------------------------------------- sampler

class RunSampler(Sampler):
    """This process's (epoch, clip index) at positions [start, stop) of a run's stream: one loader serves the run."""

    def __init__(self, n, rank=0, world=1, seed=0, per_epoch=None, start=0, stop=None):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.per_epoch = per_epoch or n // world
        self.start, self.stop = start, self.per_epoch if stop is None else stop  # positions in this stream

    def epoch_share(self, epoch):
        """This process's clip indices in epoch `epoch`, in order."""
        # Epoch e is a permutation seeded by seed + e (DistributedSampler's); process r takes every world-th clip from
        # position r (a remainder that does not divide is dropped), the first `per_epoch` of them, so no batch
        # straddles two epochs; one process with batch B x world sees the clips that world processes see at batch B.
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[:self.n - self.n % self.world][self.rank::self.world][:self.per_epoch]

    def __iter__(self):
        pos = self.start
        while pos < self.stop:
            epoch, offset = divmod(pos, self.per_epoch)
            share = self.epoch_share(epoch)[offset:offset + self.stop - pos].tolist()
            yield from ((epoch, i) for i in share)
            pos += len(share)

    def __len__(self):
        return self.stop - self.start


def steps_per_epoch(n_clips, args, ctx):
    """Optimizer steps in one epoch; a ValueError, before any work, if the data make no full step."""
    steps = n_clips // ctx.world // (args.batch_size * args.accum_iter)
    if steps == 0:
        raise ValueError(f"--data {args.data}: {n_clips} clips make no full step of --batch_size {args.batch_size}"
                         f" x --accum_iter {args.accum_iter} x {ctx.world} process(es); lower --batch_size")
    return steps


# ---------------------------------------------------------------------------------------------------- optimisation

def lr_at(step, steps_per_epoch, args):
    """Per-step schedule: linear warm-up for `warmup_epochs`, then half-cosine decay to `min_lr` (MAE)."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ramp_at(step, total_steps):
    """Pre-trained branches' rate factor, 0 -> 1 (half cosine) over half the run (official), so fusion settles first."""
    return 0.5 * (1 - math.cos(math.pi * min(step / max(total_steps / 2, 1), 1.0)))


def param_groups(named_params, weight_decay, ramp_prefixes=(), lr_scale=None):
    """AdamW groups: weight decay on tensors of 2 or more dims (weights, fusion and mask tokens), none on biases and
    norms; parameters under `ramp_prefixes` follow `ramp_at`; `lr_scale(name)` scales a rate (layer-wise decay)."""
    groups = {}
    for name, p in named_params:
        if p.requires_grad:
            g = dict(weight_decay=weight_decay if p.ndim >= 2 else 0.0, ramp=name.startswith(tuple(ramp_prefixes)),
                     lr_scale=lr_scale(name) if lr_scale else 1.0)
            groups.setdefault(tuple(g.values()), {'params': [], **g})['params'].append(p)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's and the official linear probe use it (util/lars.py)."""
    # On 2+ dim tensors the step, gradient + weight_decay x weight, is rescaled to trust_coefficient x |weight| /
    # |step|; then SGD momentum.

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in [p for p in g['params'] if p.grad is not None]:
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g['weight_decay'])
                    w, u = p.norm(), d.norm()
                    d = d * torch.where((w > 0) & (u > 0), g['trust_coefficient'] * w / u, torch.ones_like(w))
                if 'mu' not in self.state[p]:
                    self.state[p]['mu'] = torch.zeros_like(p)
                mu = self.state[p]['mu'].mul_(g['momentum']).add_(d)
                p.add_(mu, alpha=-g['lr'])


def build_optimizer(groups, args, ctx):
    """Fine-tuning's --optimizer: 'adamw', betas (0.9, --beta2), or 'lars'; pre-training's: AdamW (0.9, 0.95)."""
    if getattr(args, 'optimizer', 'adamw') == 'lars':
        return LARS(groups, lr=args.lr)
    # Fused: one pass over each parameter instead of five (measured in docs/speed.md).
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, getattr(args, 'beta2', 0.95)),
                             fused=ctx.device.type in ('cuda', 'cpu'))


def sync_batchnorm(model, ctx):
    """Under DDP on GPUs, BatchNorms become SyncBatchNorms (statistics of all processes' batch), in place."""
    # As the official Trainer does (util/misc.py). Gloo on CPUs has none: each process normalises its own batch.
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if ctx.world > 1 and ctx.device.type == 'cuda' else model


def resolve_lr(args, ctx):
    """The linear scaling rule, lr = blr * effective batch / 256 (unless --lr is set); returns the effective batch."""
    eff = args.batch_size * args.accum_iter * ctx.world
    if args.lr is None:
        args.lr = args.blr * eff / 256
    return eff


# ---------------------------------------------------------------------------------------------------- checkpoints

PREVIOUS = 'checkpoint.prev.pt'  # the checkpoint before the newest, kept until the newest is complete


def checkpoint_path(path):
    """A checkpoint file, or OUTPUT_DIR/checkpoint.pt when given a folder."""
    path = Path(path)
    return path / 'checkpoint.pt' if path.is_dir() else path


def load_checkpoint(path):
    """This project's training checkpoint (weights_only=True); a damaged file is refused, naming the previous one."""
    path = checkpoint_path(path)
    if path.exists() and not readable(path):
        raise SystemExit(f"checkpoint {path} cannot be read (truncated or damaged); the previous one, if any, is "
                         f"{path.parent / PREVIOUS}: --resume it, or --resume auto with --output_dir {path.parent}")
    return read_checkpoint(path)


def save_checkpoint(state, path, previous=None):
    """Write `state` to `path` atomically, the old file first renamed to `previous` where given."""
    # A temporary file, then a rename: a crash mid-write keeps the old one; `previous` is the fallback for a copy
    # that turns out unreadable.
    tmp = f"{path}.tmp"
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if previous and Path(path).exists():
        os.replace(path, previous)
    os.replace(tmp, path)


def auto_resume(out):
    """--resume auto: the newest checkpoint in `out` that can be read, or '' (a new run)."""
    # The log says which, and why a checkpoint was passed over; a folder whose checkpoints all fail is refused
    # rather than overwritten.
    found = [p for p in (out / 'checkpoint.pt', out / PREVIOUS) if p.exists()]
    whole = [p for p in found if readable(p)]
    if found and not whole:
        raise SystemExit(f"--resume auto: no checkpoint in {out} can be read ({', '.join(map(str, found))}: "
                         f"truncated or damaged); move them away to start a new run there")
    if os.environ.get('RANK', '0') == '0':  # before the group exists: torchrun's rank 0 speaks for all
        passed = f" ({found[0]} cannot be read: the previous checkpoint)" if whole and whole[0] != found[0] else ''
        print(f"--resume auto: continuing from {whole[0]}{passed}" if whole
              else f"--resume auto: no checkpoint in {out}: starting a new run", file=sys.stderr)
    return str(whole[0]) if whole else ''


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last checkpoint is left as it was."""


# ---------------------------------------------------------------------------------------------------- logging

class Log:
    """The means of the logged values since the last line, one JSON line in log.jsonl per `--log_interval` steps."""

    def __init__(self, path, ctx, steps_per_epoch):
        self.path, self.ctx, self.steps_per_epoch = path, ctx, steps_per_epoch
        self.reset()

    def reset(self):
        self.sums, self.micro, self.skipped, self.first_bad_step, self.t0 = {}, 0, 0, None, time.time()

    def add(self, values, step, skipped=0):
        """One micro-batch's scalar tensors (the loss among them), at optimizer step `step` (0-based)."""
        # Values are summed on the device and read once per line (one synchronisation per line, not per step); so is
        # the first step with a non-finite loss, which `line` then names in a NonFiniteLoss.
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        if self.first_bad_step is None:
            self.first_bad_step = torch.zeros((), dtype=torch.long, device=values['loss'].device)
        new_bad = ~torch.isfinite(values['loss'].detach()) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(new_bad, step + 1, self.first_bad_step)
        self.micro, self.skipped = self.micro + 1, self.skipped + skipped

    def line(self, step, lr, batch_size):
        """The line for `step`: means over micro-batches and processes (all processes take part; rank 0 writes)."""
        names = sorted(self.sums)
        skipped = torch.tensor(float(self.skipped), device=self.sums['loss'].device)
        stats = all_reduce(torch.stack([self.sums[k] for k in names] + [skipped]), self.ctx).tolist()  # the one sync
        means = {k: v / self.micro / self.ctx.world for k, v in zip(names, stats)}
        if not math.isfinite(means['loss']):  # NaN or inf on some process: which step was the first?
            first = self.first_bad_step.float()
            first = int(all_reduce(torch.where(first > 0, first, math.inf), self.ctx, 'min'))
            raise NonFiniteLoss(f"non-finite loss at step {first} (epoch {(first - 1) // self.steps_per_epoch}): "
                                + ', '.join(f"{k}={v:.4g}" for k, v in means.items() if k != 'loss')
                                + f"; stopped, the last good checkpoint {self.path.parent / 'checkpoint.pt'} is kept")
        row = {'step': step, 'epoch': round(step / self.steps_per_epoch, 4), 'lr': lr,
               **{k: round(v, 6) for k, v in means.items()},
               'clips_per_s': round(self.micro * batch_size * self.ctx.world / (time.time() - self.t0), 2)}
        if stats[-1]:
            row['skipped_clips'] = int(stats[-1])
        if self.ctx.main:
            append_log(self.path, row)
        self.reset()
        return row


def append_log(path, row):
    """Add one row (with its 'step') to a log.jsonl: values measured beside training, e.g. a monitor's."""
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def read_log(path):
    """The rows of a log.jsonl."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def trim_log(path, step):
    """Drop log lines past `step` (written after the checkpoint a run resumes from)."""
    if path.exists():
        path.write_text(''.join(json.dumps(r) + '\n' for r in read_log(path) if r['step'] <= step))


# ---------------------------------------------------------------------------------------------------- the loop

def fit(args, ctx, model, dataset, loss_fn, groups, on_checkpoint=None, find_unused_parameters=False):
    """Train `model` with loss_fn(model, batch, epoch) -> (loss, {name: scalar tensor}); returns the last log row.
    on_checkpoint(model, step) runs at step 0, each epoch's end and the last step (--save_every only checkpoints)."""
    on_checkpoint = on_checkpoint or (lambda model, step: None)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_epoch = steps_per_epoch(len(dataset), args, ctx)
    total_steps = args.epochs * per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    optimizer = build_optimizer(groups, args, ctx)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == 'fp16')  # fp16 needs loss scaling
    step = resume(args, ctx, model, optimizer, scaler, out, per_epoch) if args.resume else 0
    if step == 0:  # a new run starts a new log, and its monitors see the untrained model
        if ctx.main:
            (out / 'log.jsonl').unlink(missing_ok=True)
        on_checkpoint(model, 0)
    if args.compile:  # in place: parameters, state dict and checkpoints stay the module's own
        model.compile()
    net = model if ctx.world == 1 else nn.parallel.DistributedDataParallel(
        sync_batchnorm(model, ctx), device_ids=[ctx.device] if ctx.device.type == 'cuda' else None,
        find_unused_parameters=find_unused_parameters)
    clips = args.batch_size * args.accum_iter  # per process and step
    sampler = RunSampler(len(dataset), ctx.rank, ctx.world, args.seed, per_epoch * clips, step * clips,
                         last_step * clips)
    batches = iter(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                              collate_fn=collate, pin_memory=ctx.device.type == 'cuda'))
    log, row = Log(out / 'log.jsonl', ctx, per_epoch), {}  # logs the loss and every value of loss_fn's dict
    bar = tqdm(total=last_step, initial=step, disable=not ctx.main, dynamic_ncols=True, leave=False)
    net.train()
    while step < last_step:
        epoch = step // per_epoch
        train_step(args, ctx, net, batches, loss_fn, epoch, step, scaler, log)
        # The learning rate of this step, then the update: AdamW on the accumulated (all-reduced) gradients.
        lr = lr_at(step, per_epoch, args)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_scale'] * (ramp_at(step, total_steps) if g['ramp'] else 1.0)
        optimizer_step(optimizer, scaler)
        step += 1
        bar.update(1)
        # Each epoch and the last step write OUTPUT_DIR/checkpoint.pt and call on_checkpoint(model, step) (also
        # called before step 1); every --save_every-th step writes the checkpoint only.
        end_of_epoch = step % per_epoch == 0 or step == last_step
        save = end_of_epoch or (args.save_every and step % args.save_every == 0)
        # A line at each checkpoint too: a run resumed from it logs the same lines as the uninterrupted run.
        if step % args.log_interval == 0 or save:  # raises NonFiniteLoss before any checkpoint
            row = log.line(step, lr, args.batch_size)
            bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        if save:
            checkpoint(args, ctx, model, optimizer, scaler, step, per_epoch, out)
        if end_of_epoch:
            on_checkpoint(model, step)
            if ctx.main:  # through tqdm, so that the line is not mixed into the progress bar
                tqdm.write(f"epoch {epoch} step {step}: " + ' '.join(f"{k}={v:.4g}" for k, v in row.items()
                                                                     if k not in ('step', 'epoch')))
    bar.close()
    return row


def train_step(args, ctx, net, batches, loss_fn, epoch, step, scaler, log):
    """Forward and backward of the `accum_iter` micro-batches of one optimizer step; gradients accumulate."""
    for micro in range(args.accum_iter):
        batch = next(batches)
        skipped = batch.pop('skipped', [])  # clips that failed to decode (--skip_bad): reported, not replaced
        write_left_out(skipped, Path(args.output_dir) / 'left_out.csv')  # (nothing when there are none)
        batch = to_device(batch, ctx.device)
        # DDP all-reduces gradients during backward: only on the step's last micro-batch, the others accumulate
        # locally (no_sync), so k micro-batches cost one all-reduce and equal one batch k times as large.
        with net.no_sync() if ctx.world > 1 and micro < args.accum_iter - 1 else contextlib.nullcontext():
            with autocast(args, ctx):  # the forward under autocast, the backward outside it (torch.amp's rule)
                loss, logs = loss_fn(net, batch, epoch)
            scaler.scale(loss / args.accum_iter).backward()  # the mean over micro-batches; fp16: scaled
        log.add({'loss': loss, **logs}, step, len(skipped))


def optimizer_step(optimizer, scaler):
    """The update from the accumulated gradients (unscaled first under fp16), then the gradients cleared."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def checkpoint(args, ctx, model, optimizer, scaler, step, per_epoch, out):
    """Write OUTPUT_DIR/checkpoint.pt (rank 0): weights, optimizer, loss scale, position, RNG, the run's flags."""
    if ctx.main:
        state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                 'step': step, 'epoch': step / per_epoch, 'args': vars(args), 'rng_cpu': torch.get_rng_state()}
        if ctx.device.type == 'cuda':
            state['rng_cuda'] = torch.cuda.get_rng_state()
        save_checkpoint(state, out / 'checkpoint.pt', out / PREVIOUS)


def resume(args, ctx, model, optimizer, scaler, out, per_epoch):
    """Restore a run from `args.resume`; returns its step. Log lines written after that checkpoint are dropped."""
    state = load_checkpoint(args.resume)
    for key, obj in (('model', model), ('optimizer', optimizer), ('scaler', scaler)):
        obj.load_state_dict(state[key])
    torch.set_rng_state(state['rng_cpu'])
    if ctx.device.type == 'cuda' and 'rng_cuda' in state:
        torch.cuda.set_rng_state(state['rng_cuda'])
    trim_log(out / 'log.jsonl', state['step'])
    if ctx.main:
        print(f"resumed {checkpoint_path(args.resume)} at step {state['step']} (epoch {state['step'] / per_epoch:.2f})")
    return state['step']


def eval_loader(dataset, args, ctx, persistent=False):
    """The loader of evaluation passes over `dataset`, in order; with `persistent` its workers outlive a pass."""
    # `persistent` is for a monitor that evaluates every few epochs (the dataset must not change: the workers hold
    # their own copy).
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate,
                      pin_memory=ctx.device.type == 'cuda', persistent_workers=persistent and args.num_workers > 0)


@torch.no_grad()
def predict(model, dataset, args, ctx, fn, loader=None):
    """fn(model, batch) -> dict of tensors, over `dataset` in order, under --amp, concatenated on the CPU."""
    # Clips that fail to decode (--skip_bad) are listed in `dataset.skipped`; monitors pass their own `loader`.
    was_training = model.training
    model.eval()
    outs, loader = {}, loader or eval_loader(dataset, args, ctx)
    dataset.skipped = []
    for batch in loader:
        dataset.skipped += batch.pop('skipped', [])  # reported with the metrics, never replaced
        with autocast(args, ctx):
            for k, v in fn(model, to_device(batch, ctx.device)).items():
                outs.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in outs.items()}
