"""Downstream tasks of the paper (Sec. 4.2, App. A): a task that trains is a row of RECIPES (its training values),
an entry of TASKS (its protocol) and its head in heads.py; metrics go to OUTPUT_DIR/metrics.json (fractions in
[0, 1]; SDR, SIR, SAR in dB).

    python finetune.py --task linprobe --init output/checkpoint.pt           # synthetic data, no files needed
    python finetune.py --task finetune --preset base --init deepavfusion_vitb_vggsound.pth \\
        --data train.csv --val_data test.csv
    python finetune.py --task segment --preset base --recipe official --print_recipe   # each value's source

    linprobe   linear head on pooled --feats, encoder frozen: top-1/top-5, or mAP/AUC for multi-label data
    finetune   the same head, the whole model trained with layer-wise learning-rate decay
    knn        k-NN and 1-NN accuracy of image, audio and fusion features, retrieval R@1/5/10 (Fig. 3)
    extract    pooled image, audio and fusion features of every clip of --data, one .npy per feature
    localize   Flickr-SoundNet: cosine map of global audio vs local image features; cIoU, AUC, pointing
    segment    AVSBench: audio fused with image tokens of 4 depths, binary (S4) or per-class (AVSS); mIoU, F
    separate   mix-and-separate: a U-Net on the mixture's audio tokens, given the target's image; SDR, SIR, SAR

A preset is a whole recipe per task ('tiny': CPU scale; 'base': App. A); --recipe official takes the official
commands (docs/recipes.md); flags override either. Training, checkpoints, --resume, DDP and AMP are training.py's."""
import argparse
import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import metrics
import training
from checkpoints import read_checkpoint, read_state_dict
from data import CLIP_SECONDS, Oversampled, build_dataset, describe_row, read_manifest, window_start
from heads import Classifier, Localizer, MixAndSeparate, Segmenter, Separator
from lavish import LAVISH
from media import Video, is_videos, write_audio
from model import DeepAVFusion, pooled
from plots import overlay_grid, plot_log, save_overlay

# ---------------------------------------------------------------------------------------------------- recipes
# A run's training values come in layers, later ones winning: COMMON under its --preset, then its task's row of
# RECIPES, the row's 'paper' values (both presets) and 'paper <preset>' ones, then with --recipe official its
# 'official' and 'official <preset>' ones; flags on the command line win over all. --print_recipe shows which
# layer each value of a run came from.

# --recipe paper. 'base' is App. A: Adam (AdamW without weight decay), lr 1e-4, batch 128, 50 epochs; App. A
# gives no Adam betas: (0.9, 0.95), pre-training's. 'tiny' trains the tiny encoder in minutes on a CPU: batch 32
# and lr 1e-3, since 1e-4 barely moves in a few hundred steps.
APP_A = dict(epochs=50, warmup_epochs=0.0, batch_size=128, lr=1e-4, blr=None, weight_decay=0.0, layer_decay=1.0,
             input_norm=False, optimizer='adamw', beta2=0.95, drop_path=0.0, mixup=0.0, label_smoothing=0.0,
             heads='one', feats='image+audio', class_prior_init=False, class_weighted_loss=False, eval_windows=1,
             oversample=1, sep_mask='binary',
             # --adapter lavish, LAVISH's supplementary for dense tasks (16 latents, reduction 4, 2 groups; its
             # classification: 2 / 8 / 2, in RECIPES) and its AVS adapters' lr 1e-4 (the AVE code's too)
             lavish_tokens=16, lavish_reduction=4, lavish_groups=2, lavish_lr=1e-4)
COMMON = {'tiny': dict(APP_A, epochs=5, batch_size=32, lr=1e-3, lavish_lr=1e-3), 'base': APP_A}

# --recipe official: the official code (github.com/stoneMo/DeepAVFusion), its README's commands over the
# configs/ defaults: a batch per GPU x accum_iter x GPUs = the effective batch, lr = blr x effective batch / 256,
# AdamW with torch's betas (0.9, 0.999). 'official' holds the choices both presets keep, 'official base' the
# command's scale, 'official tiny' the tiny preset's scale (5 epochs, batch 32, lr 1e-3) with the command's
# warm-up fraction. docs/recipes.md lists each value, where it comes from and how it differs from App. A.
RECIPES = {
    'linprobe': {'paper': dict(input_norm=True),
                 # eval_linprobe.py: LARS, no weight decay; AVClassifier's three heads
                 'official': dict(optimizer='lars', weight_decay=0.0, heads='per_feature', feats='image+audio+fusion'),
                 # 10 / 60 of the run warm-up; lr 1.2, the command's (0.3 x 1024 / 256): scaled to batch 32
                 # (0.0375), LARS leaves the probe at chance in the tiny run's 240 steps (docs/recipes.md)
                 'official tiny': dict(warmup_epochs=0.83, lr=1.2),
                 'official base': dict(epochs=60, warmup_epochs=10, batch_size=64, lr=None, blr=0.3)},  # 64x4x4
    'finetune': {'paper': dict(layer_decay=0.75, lavish_tokens=2, lavish_reduction=8),
                 # configs/finetune.yaml, eval_finetune.py (mixup 1 with smoothing 0.1, joint_loss over the
                 # three heads, class-prior biases, class-weighted loss, the 10-window evaluation)
                 'official': dict(beta2=0.999, weight_decay=0.05, drop_path=0.2, mixup=1.0, label_smoothing=0.1,
                                  heads='per_feature', feats='image+audio+fusion', class_prior_init=True,
                                  class_weighted_loss=True, eval_windows=10),
                 'official tiny': dict(warmup_epochs=1.0),  # 20 / 100
                 'official base': dict(epochs=100, warmup_epochs=20, batch_size=32, lr=None, blr=3e-4)},  # 32x4x4
    # The official code has no localization training: --recipe official is the paper's.
    'localize': {'paper base': dict(epochs=30)},
    'segment': {'paper base': dict(epochs=20),
                # configs/avsegm.yaml, the S4 command; datasets.py oversamples S4 10x
                'official': dict(beta2=0.999, weight_decay=0.05, layer_decay=0.75, oversample=10),
                'official tiny': dict(epochs=1, warmup_epochs=0.2),  # one epoch of 10 visits; 20 / 100
                'official base': dict(epochs=100, warmup_epochs=20, batch_size=16, lr=None, blr=2e-4)},  # 16x8x4
    'separate': {'paper base': dict(epochs=20),
                 # configs/avsrcsep.yaml, the VGGSound-Music command: ratio mask, weighted loss
                 'official': dict(beta2=0.999, weight_decay=0.05, layer_decay=0.75, sep_mask='ratio'),
                 'official tiny': dict(warmup_epochs=0.67),  # 40 / 300
                 'official base': dict(epochs=300, warmup_epochs=40, batch_size=16, lr=None, blr=3e-4)},  # 16x8x4
    # AVSS (segment --seg_classes K > 1), over segment's row: configs/avsegm.yaml's own values, whose dataset is
    # avsbench_avss (the official README has a command for S4 only).
    'AVSS': {'official': dict(oversample=5), 'official base': dict(blr=3e-4)},
}


def recipe_layers(task, preset, recipe='paper', seg_classes=1):
    """[(where, values)] of a run's recipe, first to last (a later one wins): COMMON, the task's RECIPES, AVSS's."""
    rows = ([task] if task in RECIPES else []) + (['AVSS'] if task == 'segment' and seg_classes > 1 else [])
    parts = ['paper', f'paper {preset}'] + (['official', f'official {preset}'] if recipe == 'official' else [])
    return [(f"finetune.COMMON[{preset!r}]", COMMON[preset])] + [
        (f"finetune.RECIPES[{row!r}][{part!r}]", RECIPES[row][part])
        for row in rows for part in parts if part in RECIPES[row]]


def per_task(values):
    """{task: value} -> one value for --help: the most common one, then the tasks that differ ('-': unset)."""
    shown = {t: '-' if v is None else v for t, v in values.items()}
    reprs = [repr(v) for v in shown.values()]
    first = max(shown.values(), key=lambda v: reprs.count(repr(v)))  # max keeps the first: the same text every run
    others = [f"{t} {v}" for t, v in shown.items() if repr(v) != repr(first)]
    return f"{first} ({', '.join(others)})" if others else first


def recipes_for_help():
    """{column: {flag: value}} for --help: a column per recipe and preset, a value per flag (per_task)."""
    shown = {}
    for recipe in ('paper', 'official'):
        for preset in COMMON:
            rows = {}  # each row's values merged, AVSS's over segment's
            for row in RECIPES:
                task, seg_classes = ('segment', 2) if row == 'AVSS' else (row, 1)
                layers = recipe_layers(task, preset, recipe, seg_classes)
                rows[row] = {k: v for _, values in layers for k, v in values.items()}
            column = preset if recipe == 'paper' else f'official {preset}'
            shown[column] = {k: per_task({t: r[k] for t, r in rows.items()}) for k in COMMON[preset]}
    return shown


def get_parser():
    """The flags of fine-tuning, in groups; names shared with pretrain.py where they mean the same."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = recipes_for_help()
    g = p.add_argument_group('task and recipe')
    g.add_argument('--task', choices=list(TASKS), help='required, but on --resume: the resumed run\'s')
    g.add_argument('--init', default='none', help="checkpoint: this project's (its encoder shape comes with it) or "
                                                  "an official one (give its --preset); default: none, untrained")
    g.add_argument('--recipe', default='paper', choices=['paper', 'official'],
                   help="'paper' (App. A; default) or 'official' (the official commands): columns below")
    training.add_encoder_flags(p, recipes)
    g = p.add_argument_group('recipe: what the task trains and how (defaults per recipe and preset)')
    flag = functools.partial(training.add_recipe_flag, g, recipes=recipes)
    flag('optimizer', str, "'adamw', or 'lars' (the official linear probe)", choices=['adamw', 'lars'])
    flag('beta2', float, "AdamW's second beta (the first is 0.9)")
    flag('layer_decay', float, 'layer-wise lr decay of the encoder')
    flag('input_norm', bool, 'standardise pooled features before the linear head (official probe)')
    flag('feats', str, "pooled features for classification and knn, joined by '+': image, audio, fusion")
    flag('heads', str, "'one' linear head on the joined --feats, or 'per_feature' (official: mean logits)",
         choices=['one', 'per_feature'])
    flag('label_smoothing', float, 'targets 1 - s + s / classes on, s / classes off')
    flag('mixup', float, 'alpha: each clip mixed with its mirror in the batch, lambda ~ Beta(a, a); 0: off')
    flag('class_prior_init', bool, "head biases log((f + 1e-3) / (1 - f + 1e-3)), f a class's label share")
    flag('class_weighted_loss', bool, 'loss over the classes seen in training, multi-label terms / share')
    flag('eval_windows', int, "held-out logits averaged over this many 3 s windows of the clip's middle 10 s "
                              "(rows with a `start` keep their window)")
    flag('oversample', int, 'visits of every clip per training epoch (official AVSBench: S4 10, AVSS 5)')
    flag('sep_mask', str, "'binary': target louder than the other clip; 'ratio': target / (target + mixture)",
         choices=['binary', 'ratio'])
    g.add_argument('--adapter', default='none', choices=['none', 'lavish'],
                   help="'lavish': the backbone frozen, LAVISH's adapters and the head learn (lavish.py); default none")
    g.add_argument('--lavish_backbone', default='shared', choices=['shared', 'separate'],
                   help="lavish: 'shared' image ViT for both modalities (LAVISH; default) or the 'separate' branches")
    g.add_argument('--lavish_variant', default='ave', choices=['ave', 'avs'],
                   help="lavish: the AVE code's adapter (default) or the AVSBench code's (zero latents, gate first)")
    flag('lavish_tokens', int, 'lavish: latent tokens per adapter')
    flag('lavish_reduction', int, 'lavish: bottleneck width = D / reduction')
    flag('lavish_groups', int, "lavish: groups of the bottleneck's convolutions")
    flag('lavish_lr', float, "lavish: the adapters' lr (the head's: --lr), no layer decay")
    g = p.add_argument_group('per task')
    g.add_argument('--multilabel', action='store_true', help="synthetic data: multi-label (the sounding classes)")
    g.add_argument('--knn_k', type=int, default=20, help='knn: neighbours of the vote (default: 20)')
    g.add_argument('--knn_temperature', type=float, default=0.07, help='knn: weights exp(sim / T) (default: 0.07)')
    g.add_argument('--iou_threshold', type=float, default=0.5, help='localize: cIoU threshold (default: 0.5)')
    g.add_argument('--loc_binarize', choices=['prob', 'median'], default='prob',
                   help="localize: region = probability > 0.5 (default), or the map's top half (Flickr-SoundNet)")
    g.add_argument('--loc_gt', choices=['binary', 'consensus'], default='binary',
                   help="localize: truth = mask > 0 (default), or consensus mask / 255 -> 0, 0.5, 1 (Flickr)")
    g.add_argument('--sep_pairs', default='', help="separate: CSV of held-out pairs source_1,source_2 by `key` "
                                                   "(default: <val>_pairs.csv if present, else halves)")
    g.add_argument('--sep_condition', default='concat', choices=['concat', 'channels'], help="separate: the "
                   "picture's feature 'concat'enated at each U-Net stage (official; default) or weighting the "
                   "U-Net's last 'channels' into the mask (Sound of Pixels)")
    g.add_argument('--no_train_augment', action='store_true', help="training images cropped as the held-out ones "
                   "(no random crop or flip), for pictures a flip changes, such as digits (default: the paper's)")
    g.add_argument('--seg_classes', type=int, default=1, help='segment: 1 binary masks (S4, default); K > 1 (AVSS)')
    g.add_argument('--windows', action='store_true', help="extract, localize on videos: every 3 s window")
    g.add_argument('--audio_seconds', type=float, default=3.0, help="hear the first S s of each 3 s window, S a "
                   "multiple of 0.25 (a patch): 1 for 0.4 s words, 3x cheaper in audio; separate mixes and scores "
                   "S s (default: 3, the paper's)")
    g.add_argument('--retrieval_per_class', type=int, default=0, help='retrieval: N random clips of each class '
                                                                       '(default: 0, every clip)')
    g.add_argument('--val_data', default='', help='held-out manifest (not needed with --data synthetic)')
    g = p.add_argument_group('output')
    g.add_argument('--num_examples', type=int, default=8, help='clips drawn in PNGs / written as WAVs (default: 8)')
    training.add_training_flags(p, recipes)
    return p


def parse_args(argv=None):
    """Flags: the command line, then (with --resume) the resumed run's, then the task's recipe of the preset."""
    parser = get_parser()

    def validate(args):
        if not set(args.feats.split('+')) <= {'image', 'audio', 'fusion'}:
            parser.error(f"--feats {args.feats}: use image, audio, fusion joined by '+'")
        for name in ('eval_windows', 'oversample'):
            if getattr(args, name) < 1:
                parser.error(f"--{name} {getattr(args, name)}: must be 1 or more")
        if args.mixup < 0:
            parser.error(f"--mixup {args.mixup:g}: the Beta distribution's alpha must be > 0, or 0 for no mixup")
        if args.adapter == 'lavish' and (args.task not in ('finetune', 'localize', 'segment', 'separate')
                                         or 'fusion' in args.feats.split('+')):
            parser.error(f"--adapter lavish trains adapters on a frozen backbone, whose fusion output is constant: "
                         f"use it with --task finetune, localize, segment or separate and --feats without fusion")
        if not 0 < args.audio_seconds <= 3:
            parser.error(f"--audio_seconds {args.audio_seconds:g}: must be in (0, 3]")
        if not 0 <= args.label_smoothing < 1:
            parser.error(f"--label_smoothing {args.label_smoothing:g}: must be in [0, 1)")
    def recipe(a):
        if a.task is None:  # argparse cannot say "required unless --resume"
            parser.error("the following arguments are required: --task (or --resume a run)")
        return recipe_layers(a.task, a.preset, a.recipe, a.seg_classes)
    return training.parse_flags(parser, argv, recipe, validate)


# ---------------------------------------------------------------------------------------------------- encoder

def build_encoder(args):
    """The encoder of --init, shaped by this project's checkpoints (all but drop_path), or by the flags if official
    (a DeepAVFusion checkpoint, or a CAV-MAE one with --system cavmae)."""
    if args.init != 'none' and (args.image_init or args.audio_init):
        raise ValueError(f"--init {args.init} with --image_init / --audio_init: give the one or the others")
    # --init none: untrained, or its branches from --image_init / --audio_init (Table 3's MAE rows)
    obj = None if args.init == 'none' else read_checkpoint(training.checkpoint_path(args.init), args.weights_only)
    saved = obj.get('args') if isinstance(obj, dict) else None
    if isinstance(saved, dict) and 'preset' in saved:
        names = [f.name for f in training.encoder_fields() if f.name != 'drop_path']
        for name in [n for n in names + ['system', 'joint_layers', 'avmae_encoder'] if n in saved]:
            setattr(args, name, saved[name])
    encoder = training.make_encoder(args)
    if args.init != 'none':
        encoder.load_checkpoint(read_state_dict(obj))
    return encoder if args.adapter == 'none' else LAVISH(encoder, args.lavish_backbone, args.lavish_tokens,
                                                         args.lavish_reduction, args.lavish_groups, args.lavish_variant)


# ---------------------------------------------------------------------------------------------------- tasks

def class_frequencies(train_set, multilabel):
    """Each class's share of the training labels, the official `class_dist` (multi-label: not the share of clips)."""
    counts = torch.zeros(len(train_set.classes))
    lists = train_set.targets if hasattr(train_set, 'targets') else [  # a manifest's, or the synthetic clips'
        train_set.clip_classes(i, multilabel) for i in range(len(train_set))]
    for classes in lists:
        counts[classes] += 1
    return counts / counts.sum()


def prior_bias(freq):
    """Head biases whose sigmoid is about each class's share f (official eval_finetune.py)."""
    return torch.log((freq + 1e-3) / (1 - freq + 1e-3))


def soft_targets(target, num_classes, smoothing, multilabel):
    """Class indices (or multi-hot rows) -> smoothed probabilities (the official mixup_target, timm's)."""
    hot = target.float() if multilabel else F.one_hot(target, num_classes).float()
    return hot * (1 - smoothing) + smoothing / num_classes


def mixup(image, audio, targets, lam):
    """Clip i mixed with clip B - 1 - i by its own lam[i]: image, spectrogram, soft targets (the official AVMixup)."""
    def mix(x):
        w = lam.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return w * x + (1 - w) * x.flip(0)
    return mix(image), mix(audio), mix(targets)


def classification_loss(logits, targets, multilabel, freq=None):
    """Cross-entropy with soft targets, or multi-label BCE; with `freq` (the official weighted loss) only classes seen
    count, multi-label terms over their share (the official single-label division is a constant: left out)."""
    if freq is not None:
        seen = freq > 0
        logits, targets, freq = logits[:, seen], targets[:, seen], freq[seen]
    if not multilabel:
        return F.cross_entropy(logits, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    return (loss / freq).mean() if freq is not None else loss.mean()


def predict_windows(model, dataset, args, ctx, fn, n):
    """training.predict over n windows of every held-out clip (official: 10), floating outputs averaged over them."""
    runs = []
    for k in range(n):
        dataset.window = (k, n) if n > 1 else None
        runs.append(training.predict(model, dataset, args, ctx, fn))
    dataset.window = None
    if len({len(next(iter(r.values()))) for r in runs}) > 1:
        raise RuntimeError(f"--eval_windows {n}: some clips failed to decode in some windows only (--skip_bad); "
                           f"evaluate them with --eval_windows 1")
    return {k: torch.stack([r[k] for r in runs]).mean(0) if v.is_floating_point() else v for k, v in runs[0].items()}


def setup_classification(encoder, train_set, args, ctx):
    """linprobe / finetune: (model, loss_fn, evaluate)."""
    multilabel = getattr(train_set, 'multilabel', False) or args.multilabel
    key = 'labels' if args.data == 'synthetic' and args.multilabel else 'label'
    model = Classifier(encoder, args.feats.split('+'), len(train_set.classes), frozen=args.task == 'linprobe',
                       input_norm=args.input_norm, per_feature=args.heads == 'per_feature')
    freq = class_frequencies(train_set, multilabel) if args.class_prior_init or args.class_weighted_loss else None
    if args.class_prior_init:
        for head in model.linear_heads():
            head.bias.data.copy_(prior_bias(freq))
    weights = freq.to(ctx.device) if args.class_weighted_loss else None

    def loss_fn(net, batch, epoch):
        image, audio = batch['image'], batch['audio']
        targets = soft_targets(batch[key], len(train_set.classes), args.label_smoothing, multilabel)
        if args.mixup:  # lambdas from (seed, epoch, the batch's clips): the same on --resume
            rng = np.random.default_rng([args.seed, epoch, *batch['index'].tolist()])
            lam = torch.from_numpy(rng.beta(args.mixup, args.mixup, len(targets))).to(targets.device)
            image, audio, targets = mixup(image, audio, targets, lam)
        return classification_loss(net(image, audio).float(), targets, multilabel, weights), {}

    def evaluate(model, val_set):
        def fn(m, b):
            logits, per_head = m(b['image'], b['audio'], each=True)
            return {'logits': logits, **{f'logits_{f}': v for f, v in per_head.items()}, 'target': b[key]}
        # Synthetic clips are 3 s long: every window is the same one.
        windows = args.eval_windows if hasattr(val_set, 'rows') else 1
        res = predict_windows(model, val_set, args, ctx, fn, windows)
        scores = {}
        for name in [k for k in res if k.startswith('logits')]:
            m = (metrics.multilabel_metrics(torch.sigmoid(res[name]).numpy(), res['target'].numpy()) if multilabel
                 else {f'top{k}': v for k, v in metrics.topk_accuracy(res[name], res['target']).items()})
            scores.update({k + name[len('logits'):]: v for k, v in m.items()})
        return {**scores, 'eval_windows': windows}

    return model, loss_fn, evaluate


def setup_localize(encoder, train_set, args, ctx):
    """localize: (model, loss_fn, evaluate)."""
    model = Localizer(encoder)

    def loss_fn(net, batch, epoch):
        return F.binary_cross_entropy_with_logits(net(batch['image'], batch['audio']).float(),
                                                  (batch['mask'] > 0).float()), {}

    def evaluate(model, val_set):
        res = training.predict(model, val_set, args, ctx, lambda m, b: {
            'prob': torch.sigmoid(m(b['image'], b['audio'])), 'gt': b['mask'], 'image': b['image']})
        prob, gt = res['prob'], res['gt'].float()
        gt = (gt * 2 / 255).round().clamp(max=2) / 2 if args.loc_gt == 'consensus' else (gt > 0).float()
        region = metrics.top_half(prob) if args.loc_binarize == 'median' else prob > 0.5
        n = args.num_examples
        overlay_grid(res['image'][:n], prob[:n], gt[:n] > 0, Path(args.output_dir) / 'localization.png',
                     'image | predicted map | ground truth')
        return {**metrics.localization_metrics(region, gt, args.iou_threshold),
                'pointing': metrics.pointing_game(prob, gt)}

    return model, loss_fn, evaluate


def setup_segment(encoder, train_set, args, ctx):
    """segment: (model, loss_fn, evaluate). Binary (S4) with --seg_classes 1, else background + K classes."""
    binary = args.seg_classes == 1
    model = Segmenter(encoder, 1 if binary else args.seg_classes + 1)

    def target(batch):
        return (batch['mask'] > 0).float() if binary else batch['mask'].clamp(max=args.seg_classes)

    def loss_fn(net, batch, epoch):
        logits = net(batch['image'], batch['audio']).float()
        if binary:
            return F.binary_cross_entropy_with_logits(logits[:, 0], target(batch)), {}
        return F.cross_entropy(logits, target(batch)), {}

    def evaluate(model, val_set):
        def fn(m, b):
            logits = m(b['image'], b['audio']).float()
            pred = torch.sigmoid(logits[:, 0]) if binary else logits.argmax(1)
            return {'pred': pred, 'gt': target(b), 'image': b['image']}
        res = training.predict(model, val_set, args, ctx, fn)
        n = args.num_examples
        shown = res['pred'][:n] if binary else (res['pred'][:n] > 0).float()
        overlay_grid(res['image'][:n], shown, res['gt'][:n] > 0, Path(args.output_dir) / 'segmentation.png',
                     'image | predicted mask | ground truth')
        if binary:
            return metrics.binary_segmentation_metrics(res['pred'], res['gt'])
        return metrics.semantic_segmentation_metrics(res['pred'].long(), res['gt'].long(), args.seg_classes + 1)

    return model, loss_fn, evaluate


def separation_pairs(val_set, args):
    """Evaluation pairs (indices into `val_set`), their source: --sep_pairs, <val>_pairs.csv (official list), halves."""
    path = args.sep_pairs or (str(Path(args.val_data).with_suffix('')) + '_pairs.csv' if args.val_data else '')
    if not path or not Path(path).exists():
        if args.sep_pairs:
            raise FileNotFoundError(f"--sep_pairs {args.sep_pairs}: not found")
        half = len(val_set) // 2
        return [(i, i + half) for i in range(half)], 'manifest order (first half with second half)'
    header, rows = read_manifest(path)
    if not {'source_1', 'source_2'} <= set(header):
        raise ValueError(f"{path}: a pairs file needs columns source_1,source_2 (clip keys), got {header}")
    index = {r.get('key'): i for i, r in enumerate(getattr(val_set, 'rows', []))}
    missing = [(n + 2, r[c]) for n, r in enumerate(rows) for c in ('source_1', 'source_2') if r[c] not in index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} clip(s) not in the held-out manifest's `key` column (or left "
                         f"out by --skip_bad), e.g. row {missing[0][0]}: {missing[0][1]!r}")
    return [(index[r['source_1']], index[r['source_2']]) for r in rows], path


def setup_separate(encoder, train_set, args, ctx):
    """separate: (model, loss_fn, evaluate); training mixes each clip with the one before it, evaluation fixed pairs."""
    model = Separator(encoder, args.sep_condition)
    mix = MixAndSeparate(ctx.device)

    def loss_fn(net, batch, epoch):
        audio, mask, weight = mix.inputs(batch['waveform'], batch['waveform'].roll(1, dims=0), args.sep_mask)
        return F.binary_cross_entropy_with_logits(net(batch['image'], audio).float(), mask, weight), {}

    @torch.no_grad()
    def evaluate(model, val_set):
        # A fixed list of pairs (the official VGGSound-Music protocol): each pair mixed, separated twice (once
        # with each clip's picture), both sources scored together by BSS-eval; a pair with a near-silent source
        # or estimate is skipped and counted (official: energy < 1e-5).
        # The mixture itself is scored as both estimates too: SDR_mixture is what no separation gets, and SDRi,
        # the gain over it pair by pair, is what the head learned (the measure many separation papers report).
        pairs, source = separation_pairs(val_set, args)
        model.eval()
        scores, skipped, examples = {k: [] for k in ('SDR', 'SIR', 'SAR', 'SDR_mixture', 'SDRi')}, [], 0
        out = Path(args.output_dir) / 'separated'
        out.mkdir(exist_ok=True)
        for lo in range(0, len(pairs), args.batch_size):
            chunk = pairs[lo:lo + args.batch_size]
            items = {k: val_set[k] for pair in chunk for k in pair}
            bad = [k for k, it in items.items() if 'skipped' in it]  # --skip_bad: reported, never replaced
            if bad:
                val_set.skipped += [items[k]['skipped'] for k in bad]
            chunk = [(i, j) for i, j in chunk if i not in bad and j not in bad]
            if not chunk:
                continue
            a, b = (torch.stack([items[p[side]]['waveform'] for p in chunk]).to(ctx.device) for side in (0, 1))
            images = [torch.stack([items[p[side]]['image'] for p in chunk]).to(ctx.device) for side in (0, 1)]
            audio, _, _ = mix.inputs(a, b)  # the same mixture a + b for both
            with training.autocast(args, ctx):
                est = [mix.separate(model(images[side], audio), a + b) for side in (0, 1)]
            for n, (i, j) in enumerate(chunk):
                refs, ests = torch.stack([a[n], b[n]]).cpu(), torch.stack([est[0][n], est[1][n]]).cpu()
                if (refs.pow(2).sum(1) < 1e-5).any() or (ests.pow(2).sum(1) < 1e-5).any():
                    skipped.append((i, j))
                    continue
                got = metrics.separation_metrics(refs, ests)
                got['SDR_mixture'] = metrics.separation_metrics(refs, refs.sum(0).expand(2, -1))['SDR']
                for k, v in {**got, 'SDRi': got['SDR'] - got['SDR_mixture']}.items():
                    scores[k] += [float(x) for x in v]
                if examples < args.num_examples:  # WAVs: the mixture (at half), each source, each estimate
                    write_audio(out / f'{examples:02d}_mixture.wav', (refs.sum(0) / 2).numpy())
                    for name, wave in zip(('source1', 'source2', 'estimate1', 'estimate2'), [*refs, *ests]):
                        write_audio(out / f'{examples:02d}_{name}.wav', wave.numpy())
                    examples += 1
        return {**{k: float(np.mean(v)) if v else float('nan') for k, v in scores.items()}, 'pairs': len(pairs),
                'pairs_scored': len(scores['SDR']) // 2, 'pairs_silent': len(skipped), 'pairs_from': source}

    return model, loss_fn, evaluate


def run_knn(encoder, args, ctx):
    """Nearest-neighbour probes (Fig. 3), no training: k-NN vote, official 1-NN leave-one-out, R@k (docs/metrics.md)."""
    train_set, val_set = build_splits(args, ctx, train=False)

    def fn(m, b):
        return {**pooled(m(b['image'], b['audio'])), 'label': b['label']}

    bank, queries = (training.predict(encoder, s, args, ctx, fn) for s in (train_set, val_set))
    names = ('image', 'audio', 'fusion')
    scores = metrics.nearest_neighbour_loo({f: queries[f] for f in names}, queries['label'])
    if not getattr(train_set, 'multilabel', False):  # votes and recall need one class per clip
        for f in names:
            pred = metrics.knn_predict(bank[f], bank['label'], queries[f], args.knn_k, args.knn_temperature,
                                       len(train_set.classes))
            scores[f'knn_{f}'] = (pred == queries['label']).float().mean().item()
        feats = args.feats.split('+')  # retrieval with the --feats features, each normalised, concatenated
        joined = [torch.cat([F.normalize(x[f], dim=1) for f in feats], dim=1) for x in (bank, queries)]
        scores.update(metrics.recall_at_k(joined[0], bank['label'], joined[1], queries['label']))
    return {**scores, **training.left_out_report(val_set)}


def run_retrieval(encoder, args, ctx):
    """Cross-modal retrieval, no training: CAV-MAE's protocol (uni-modal passes, cosine) on --data (docs/systems.md)."""
    if not ctx.main:
        return {}
    full = dataset = run_dataset(args, args.data, False, split='val')
    if args.retrieval_per_class:  # N random clips of each class, as CAV-MAE's retrieval subsets
        by_class = {}  # each class's clips, in a random order
        for i in np.random.default_rng(args.seed).permutation(len(full)).tolist():
            c = full.targets[i][0] if hasattr(full, 'targets') else full.clip_classes(i)[0]
            by_class.setdefault(c, []).append(i)
        picked = sorted(i for clips in by_class.values() for i in clips[:args.retrieval_per_class])
        dataset = torch.utils.data.Subset(full, picked)
    feats = training.predict(encoder, dataset, args, ctx, lambda m, b: pooled(m(b['image'], b['audio'], unimodal=True)))
    full.skipped = dataset.skipped  # clips that failed to decode, for the report
    sim = F.normalize(feats['image'], dim=1) @ F.normalize(feats['audio'], dim=1).T
    return {**metrics.cross_modal_retrieval(sim, 'v2a_'), **metrics.cross_modal_retrieval(sim.T, 'a2v_'),
            'clips': len(sim), **training.left_out_report(full)}


def run_extract(encoder, args, ctx):
    """features_{image,audio,fusion}.npy, a row per clip of --data, and clips.csv naming each (docs/datasets.md)."""
    if not ctx.main:
        return {}
    dataset = run_dataset(args, args.data, False, windows=args.windows)
    feats = training.predict(encoder, dataset, args, ctx,
                             lambda m, b: {**pooled(m(b['image'], b['audio'])), 'index': b['index']})
    index = feats.pop('index').tolist()
    out = Path(args.output_dir)
    for f, x in feats.items():
        np.save(out / f'features_{f}.npy', x.numpy().astype(np.float32))
    rows = getattr(dataset, 'rows', None)  # a manifest's or the videos'; the synthetic clips go by their index
    with open(out / 'clips.csv', 'w', newline='') as f:  # which clip each feature row is
        writer = csv.writer(f)
        writer.writerow(['feature_row', 'clip'] if rows is None else ['feature_row', 'manifest_row', 'clip', 'start'])
        writer.writerows([k, i] if rows is None else
                         [k, dataset.row_numbers[i], describe_row(rows[i]), rows[i].get('start', '')]
                         for k, i in enumerate(index))
    return {'clips': len(index), 'dim': int(feats['image'].shape[1]),
            'files': [f'features_{f}.npy' for f in feats] + ['clips.csv'], **training.left_out_report(dataset)}


def localize_videos(encoder, args, ctx):
    """localize on one's own videos: each clip's (or window's) map over its frame, a PNG each (docs/datasets.md)."""
    if not ctx.main:
        return {}
    model = Localizer(encoder).to(ctx.device)
    if args.init != 'none':
        state = read_state_dict(training.checkpoint_path(args.init), args.weights_only)
        model.load_state_dict({k: v for k, v in state.items() if k in ('scale', 'offset')}, strict=False)
    dataset = run_dataset(args, args.data, False, windows=args.windows)
    res = training.predict(model, dataset, args, ctx, lambda m, b: {
        'prob': torch.sigmoid(m(b['image'], b['audio'])), 'image': b['image'], 'index': b['index']})
    out = Path(args.output_dir) / 'localization'
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for image, prob, i in zip(res['image'], res['prob'], res['index'].tolist()):
        row = dataset.rows[i]
        with Video(row['video']) as video:  # the window the clip was scored on (centred without --windows)
            start = window_start(video.duration, start=float(row['start']) if row.get('start') else None)
        name = f"{Path(row['video']).stem}_{start:07.2f}s.png"
        save_overlay(image, prob, out / name, f"{Path(row['video']).name}, {start:.1f}-{start + CLIP_SECONDS:.1f} s:"
                                               f" frame | sounding region")
        written.append(name)
    return {'clips': len(written), 'files': [f'localization/{n}' for n in written], **training.left_out_report(dataset)}


def layer_decay_scale(depth, decay, joint_layers=0):
    """Layer-wise lr decay: a parameter of layer id (below) learns at decay^(depth + 1 - id)."""
    # CAV-MAE's and Audiovisual MAE's `joint_layers` joint blocks are the last layers.
    def scale(name):
        parts = name.split('.')
        layer = 0  # patch embeddings, fusion tokens
        if parts[0] != 'encoder' or parts[1].startswith(('fusion_norm', 'norm')) or parts[2:3] == ['norm']:
            layer = depth + 1  # the head, final norms
        elif parts[1] in ('fusion_blocks', 'blocks_a', 'blocks_v'):  # encoder.fusion_blocks.<i>, CAV-MAE's
            layer = int(parts[2]) + 1
        elif parts[1] in ('blocks_u', 'blocks'):  # CAV-MAE's, Audiovisual MAE's joint layers
            layer = depth - joint_layers + int(parts[2]) + 1
        elif parts[2:3] == ['blocks']:  # encoder.image.blocks.<i>, encoder.audio.blocks.<i>
            layer = int(parts[3]) + 1
        return decay ** (depth + 1 - layer)
    return scale



@dataclass
class Task:
    """A task's protocol: `setup` builds its model, loss and evaluation, or `run` does the whole task; `videos` runs
    it on one's own videos; `columns`: what its manifests need; `waveform`: clips carry their waveform."""
    setup: Optional[Callable] = None
    run: Optional[Callable] = None
    videos: Optional[Callable] = None
    columns: tuple = ()
    waveform: bool = False
    # the held-out crop's fraction of the resized image (0.875: the official classification; 1: the whole frame)
    eval_crop: float = 0.875


TASKS = {
    'linprobe': Task(setup_classification, columns=('label',)),
    'finetune': Task(setup_classification, columns=('label',)),
    'knn': Task(run=run_knn, columns=('label',)),
    'extract': Task(run=run_extract, videos=run_extract),
    'retrieval': Task(run=run_retrieval),
    # Flickr-SoundNet's consensus maps cover the whole frame (EZ-VSL's test transform: Resize((224, 224))).
    'localize': Task(setup_localize, videos=localize_videos, columns=('mask',), eval_crop=1.0),
    'segment': Task(setup_segment, columns=('mask',), eval_crop=1.0),  # official: a 224 x 224 resize
    'separate': Task(setup_separate, waveform=True),
}


# ---------------------------------------------------------------------------------------------------- main

def run_dataset(args, data, train, **kw):
    """build_dataset under the run's flags (--image_size, --seed, --skip_bad, --synthetic_*, --audio_seconds)."""
    return build_dataset(data, args.image_size, train, seed=args.seed, skip_bad=args.skip_bad,
                         synthetic_clips=args.synthetic_clips, synthetic_classes=args.synthetic_classes,
                         audio_seconds=args.audio_seconds, **kw)


def build_splits(args, ctx, train=True):
    """The task's training data (--data, augmented when `train`) and held-out data (--val_data)."""
    task = TASKS[args.task]
    common = dict(task=args.task, require=task.columns, return_waveform=task.waveform)
    if args.data != 'synthetic' and not args.val_data:
        raise ValueError(f"--task {args.task} evaluates on a held-out split: give --val_data (a manifest)")
    train_set = run_dataset(args, args.data, train, split='train', speed_perturb=args.speed_perturb, **common)
    val_set = run_dataset(args, args.val_data or 'synthetic', False, split='val',
                          classes=getattr(train_set, 'classes', None), **common)
    val_set.image_fe.crop_ratio = task.eval_crop
    if args.no_train_augment:  # results/avdigits.md: on digit canvases the crops and flips cost 0.09 of pointing
        train_set.image_fe.augment, train_set.image_fe.crop_ratio = False, task.eval_crop
    training.report_left_out([train_set, val_set], args, ctx)
    return train_set, val_set


def train_and_evaluate(encoder, args, ctx):
    """Train the task's model on --data (training.fit), then evaluate it on --val_data (rank 0)."""
    train_set, val_set = build_splits(args, ctx)
    epoch_set = Oversampled(train_set, args.oversample) if args.oversample > 1 else train_set
    training.steps_per_epoch(len(epoch_set), args, ctx)  # no full step: stop now, before any work
    model, loss_fn, evaluate = TASKS[args.task].setup(encoder, train_set, args, ctx)
    model.to(ctx.device)
    eff = training.resolve_lr(args, ctx)
    if ctx.main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        visits = f" x {args.oversample} visits" if args.oversample > 1 else ''
        print(f"{args.task} ({args.recipe} recipe): init {args.init}, {len(train_set)}{visits} training / "
              f"{len(val_set)} held-out clips, {trainable / 1e6:.2f}M trainable parameters, {ctx.world} process(es) "
              f"on {ctx.device}, {args.optimizer}, effective batch {eff}, lr {args.lr:.3g}, {args.epochs} epochs "
              f"({args.warmup_epochs:g} warm-up) -> {args.output_dir}", flush=True)
    decay = layer_decay_scale(encoder.config.depth, args.layer_decay, getattr(encoder, 'joint_layers', 0))
    head = getattr(model, 'lr_scales', {})

    def lr_scale(name):  # LAVISH's adapters learn at --lavish_lr; the backbone by layer, the head at --lr
        return args.lavish_lr / args.lr if '.adapters.' in name else decay(name) * head.get(name, 1.0)
    groups = training.param_groups(model.named_parameters(), args.weight_decay, lr_scale=lr_scale)

    def on_checkpoint(model, step):
        if ctx.main:
            plot_log(Path(args.output_dir, 'log.jsonl'), Path(args.output_dir, 'loss_curve.png'), title=args.task)

    # find_unused_parameters: e.g. the fusion blocks get no gradient when --feats leaves fusion out.
    training.fit(args, ctx, model, epoch_set, loss_fn, groups, on_checkpoint, find_unused_parameters=True)
    return {**evaluate(model, val_set), 'trainable': trainable, **training.left_out_report(val_set)} if ctx.main else {}


def main(argv=None):
    args = parse_args(argv)
    with training.processes(args) as ctx:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        encoder = build_encoder(args).to(ctx.device)
        task = TASKS[args.task]
        if is_videos(args.data) and not task.videos:
            raise ValueError(f"--data {args.data}: videos without a manifest work with --task "
                             f"{' or '.join(t for t, k in TASKS.items() if k.videos)}; --task {args.task} needs a "
                             f"manifest with {', '.join(task.columns) or 'its columns'}")
        result = (task.videos if is_videos(args.data) else (task.run or train_and_evaluate))(encoder, args, ctx)
        if ctx.main:
            result = {'task': args.task, 'init': str(args.init), **result}
            Path(args.output_dir, 'metrics.json').write_text(json.dumps(result, indent=2) + '\n')
            print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
