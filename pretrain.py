"""Self-supervised pre-training of DeepAVFusion with the audio-visual masked auto-encoder (paper Sec. 3.2, 4.1).

    python pretrain.py                                  # tiny recipe, built-in synthetic data: minutes on a CPU
    python pretrain.py --data train.csv                 # tiny recipe on your clips (a manifest)
    torchrun --nproc_per_node=8 pretrain.py --preset base --data vggsound_train.csv \\
        --image_init mae_pretrain_vit_base.pth --audio_init audiomae_vitb_as2m.pth   # the paper's run

This file is the recipe (RECIPES), its flags, the loss (Eq. 16) and main(); training.py holds what it shares with
finetune.py. A preset is a whole recipe, whatever --data is; any flag overrides it (--help, --print_recipe)."""
import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset

import training
from audiovisual_mae import DECODERS, OBJECTIVES, AudiovisualMAE
from cavmae import CAVMAE, contrastive_loss
from data import build_dataset, clip_generator, finish_on_device
from mae import AVMAE
import metrics
from model import pooled
from plots import plot_log, save_reconstructions

# ---------------------------------------------------------------------------------------------------- the recipe

# The encoder's shape comes from model.PRESETS under the same name; these are the rest of each recipe.
RECIPES = {
    # CPU scale: `python pretrain.py` (1536 synthetic clips) takes about 3 minutes on 2 cores.
    'tiny': dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=4, epochs=3, warmup_epochs=0.5,
                 batch_size=32, blr=5e-3, weight_decay=0.05),
    # Sec. 4.1: decoders of 8 blocks at width 512, AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 scaled by
    # batch / 256, 40 warm-up epochs of 200 (batch 64 per process: 512 on 8 GPUs).
    'base': dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16, epochs=200, warmup_epochs=40,
                 batch_size=64, blr=1.5e-4, weight_decay=0.05),
}


# The compared pre-training systems (docs/systems.md): what each sets beside its preset's recipe; a row named
# '<system> <preset>' holds what it sets at that preset only.
SYSTEMS = {
    'deepavfusion': dict(image_mask_ratio=0.75, audio_mask_ratio=0.8, contrast_weight=0.0, norm_pix_loss=True,
                         image_loss_weight=1.0, audio_loss_weight=1.0),  # Eq. 16: the sum
    # CAV-MAE (its Sec. 2.3 and scripts): 75% of both masked, lambda_c 0.01; branches and a joint layer, no fusion
    'cavmae': dict(image_mask_ratio=0.75, audio_mask_ratio=0.75, contrast_weight=0.01, norm_pix_loss=True,
                   image_loss_weight=1.0, audio_loss_weight=1.0, fusion='none', fusion_layers='none',
                   joint_layers=training.JOINT_LAYERS['cavmae']),
    # Audiovisual MAE (its Sec. 4.1 and configs): 90% of the image and 50% of the audio masked, raw targets,
    # the modalities' losses weighted 0.5 / 0.5 (configs/vggsound/pretrain.py)
    'avmae': dict(image_mask_ratio=0.9, audio_mask_ratio=0.5, contrast_weight=0.0, norm_pix_loss=False,
                  image_loss_weight=0.5, audio_loss_weight=0.5, fusion='none', fusion_layers='none',
                  joint_layers=training.JOINT_LAYERS['avmae']),  # mid-fusion's S
    # ... and at ViT-B its configs' decoder (384 x 4 blocks x 6 heads, its Table 15) and optimiser: AdamW (0.9, 0.95)
    # with decoupled weight decay 0.05, base lr 1.5e-4 x batch / 256, 4 warm-up epochs of 400, where its paper
    # says weight decay 0 and 40 warm-up epochs (Table 14); the configs are followed here.
    'avmae base': dict(decoder_dim=384, decoder_depth=4, decoder_num_heads=6, blr=1.5e-4, weight_decay=0.05,
                       epochs=400, warmup_epochs=4),
}


def get_parser():
    """The flags of pre-training."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_encoder_flags(p)
    g = p.add_argument_group('the masked auto-encoder (Sec. 3.2)')
    every = {**RECIPES, **SYSTEMS}  # a system's row wins over its preset's (--print_recipe says which gave what)
    training.add_recipe_flag(g, 'decoder_dim', int, 'decoder width', every)
    training.add_recipe_flag(g, 'decoder_depth', int, 'decoder blocks', every)
    training.add_recipe_flag(g, 'decoder_num_heads', int, 'decoder attention heads', every)
    training.add_recipe_flag(g, 'image_mask_ratio', float, 'hidden image patches', SYSTEMS)
    training.add_recipe_flag(g, 'audio_mask_ratio', float, 'hidden audio patches', SYSTEMS)
    training.add_recipe_flag(g, 'norm_pix_loss', bool, 'targets: each patch normalised by its own mean and '
                                                       'variance (MAE)', SYSTEMS)
    training.add_recipe_flag(g, 'image_loss_weight', float, "weight of the image's reconstruction loss", SYSTEMS)
    training.add_recipe_flag(g, 'audio_loss_weight', float, "weight of the audio's reconstruction loss", SYSTEMS)
    g = p.add_argument_group('compared systems and extra terms (docs/systems.md)')
    g.add_argument('--modalities', default='image+audio', choices=['image+audio', 'image', 'audio'],
                   help="'image' or 'audio': a uni-modal MAE (MAE, AudioMAE), one branch, no fusion (default: both)")
    g.add_argument('--avmae_decoder', default='shared', choices=DECODERS,
                   help="avmae: its decoder (Sec. 3.3): one applied to each modality (default), two, or one joint")
    g.add_argument('--avmae_objective', default='joint', choices=OBJECTIVES,
                   help="avmae: joint reconstruction (default) or inpainting a modality from the other (Sec. 3.4)")
    training.add_recipe_flag(g, 'contrast_weight', float, "weight of CAV-MAE's contrastive term (Eq. 7)", SYSTEMS)
    g.add_argument('--contrast_on', default='unimodal', choices=['unimodal', 'branch'],
                   help="its features: a second pass of the branches alone (default), or the branch outputs")
    g.add_argument('--contrast_tau', type=float, default=0.05, help="its temperature (default: 0.05, CAV-MAE's)")
    g.add_argument('--contrast_bidirectional', action='store_true', help='both directions (default: image to audio)')
    g.add_argument('--contrast_gather', action='store_true', help="negatives from every process (default: this "
                                                                  "process's clips, as CAV-MAE's code)")
    g.add_argument('--contrast_batch', type=int, default=0, help='negatives within groups of this many clips of a '
                                                                 "process's batch (default: 0, all of them)")
    g = p.add_argument_group('monitor and loader')
    g.add_argument('--knn_every', type=int, default=0, help='every N epochs, 1-NN accuracy of the features on '
                                                            '--knn_data (Fig. 3), logged (default: 0, off)')
    g.add_argument('--knn_data', default='', help="held-out manifest with labels for --knn_every (default with "
                                                  "--data synthetic: its held-out clips)")
    g.add_argument('--device_frontend', action='store_true', help='normalise images and make spectrograms on the '
                                                                  'training device, not in the loader (default: off)')
    training.add_training_flags(p, every)
    return p


def parse_args(argv=None):
    """Flags: the command line, then (--resume) the resumed run's, then the preset's, system's, uni-modal MAE's."""
    def recipe(a):
        no_fusion = dict(fusion='none', fusion_layers='none')
        unimodal = [] if a.modalities == 'image+audio' else [('--modalities', no_fusion)]
        at_preset = f'{a.system} {a.preset}'
        return [(f"pretrain.RECIPES[{a.preset!r}]", RECIPES[a.preset]),
                (f"pretrain.SYSTEMS[{a.system!r}]", SYSTEMS[a.system]), *unimodal,
                *([(f"pretrain.SYSTEMS[{at_preset!r}]", SYSTEMS[at_preset])] if at_preset in SYSTEMS else [])]
    parser = get_parser()

    def validate(args):
        if args.knn_every and not args.knn_data:
            if args.data != 'synthetic':
                parser.error('--knn_every needs --knn_data, a held-out manifest with a label column')
            args.knn_data = 'synthetic'
        layers = len(training.encoder_config(args).fusion_layer_ids)
        if args.system != 'deepavfusion' and (args.modalities != 'image+audio' or args.image_init or args.audio_init):
            parser.error(f"--system {args.system}: both modalities, and no --image_init / --audio_init (not "
                         f"implemented)")
        if args.system == 'avmae' and args.contrast_weight and args.avmae_encoder == 'early':
            parser.error("--contrast_weight with --avmae_encoder early: it has no uni-modal stream (every layer reads "
                         "both modalities), and a contrastive term on it would collapse (CAV-MAE Sec. 2.3)")
        if args.modalities != 'image+audio' and (layers or args.contrast_weight):
            parser.error(f"--modalities {args.modalities}: a uni-modal MAE has no fusion layers and no contrastive "
                         f"term")
        if args.contrast_weight and args.contrast_on == 'branch' and layers > 1:
            parser.error(f"--contrast_on branch: with {layers} fusion layers each branch reads the other modality "
                         f"through the fusion tokens (Eq. 2-3), and a contrastive term on their outputs would "
                         f"collapse (CAV-MAE Sec. 2.3); use --contrast_on unimodal, or at most one fusion layer")
    return training.parse_flags(parser, argv, recipe, validate)


def build_mae(args):
    """The masked auto-encoder of --system (AVMAE, CAV-MAE's or Audiovisual MAE's) around a fresh encoder."""
    shared = (training.make_encoder(args), args.decoder_dim, args.decoder_depth, args.decoder_num_heads,
              args.image_mask_ratio, args.audio_mask_ratio, args.norm_pix_loss)
    if args.system == 'cavmae':
        return CAVMAE(*shared)
    if args.system == 'avmae':
        return AudiovisualMAE(*shared, args.avmae_decoder, args.avmae_objective)
    return AVMAE(*shared, args.modalities.split('+'))


# ---------------------------------------------------------------------------------------------------- the loss

class WithMaskingNoise(Dataset):
    """Clips with masking noise from (seed, epoch, index), not the process count, drawn in workers (docs/speed.md)."""

    def __init__(self, dataset, num_patches, seed):
        self.dataset, self.num_patches, self.seed = dataset, num_patches, seed

    def __len__(self):
        return len(self.dataset)

    def add_noise(self, key, item):
        """The item of dataset key `key`, with its masking noise."""
        if 'skipped' not in item:  # a clip that failed to decode (--skip_bad) is dropped from its batch anyway
            epoch, index = self.dataset.split_key(key)
            g = clip_generator(self.seed, epoch, index, stream=1)
            item['noise_image'], item['noise_audio'] = (torch.rand(n, generator=g) for n in self.num_patches)
        return item

    def __getitem__(self, key):
        return self.add_noise(key, self.dataset[key])

    def __getitems__(self, keys):
        """A batch, the clips' spectrograms computed together (data.AVDataset.__getitems__)."""
        return [self.add_noise(k, item) for k, item in zip(keys, self.dataset.__getitems__(keys))]


def make_loss_fn(args):
    """loss_fn(model, batch, epoch) for training.fit: the MAE on the batch and its masking noise, `pretraining_loss`."""
    def loss_fn(net, batch, epoch):
        if args.device_frontend:
            batch = finish_on_device(batch)
        unimodal_pass = bool(args.contrast_weight) and args.contrast_on == 'unimodal'
        out = net(batch['image'], batch['audio'], batch['noise_image'], batch['noise_audio'], unimodal_pass)
        return pretraining_loss(out, args)
    return loss_fn


def pretraining_loss(out, args):
    """Eq. 16: the masked reconstruction losses (Eq. 14) weighted by --*_loss_weight (1 / 1: the sum; Audiovisual
    MAE's 0.5 / 0.5) plus --contrast_weight x CAV-MAE's Eq. 7: (loss, terms), each term logged (README: Forking)."""
    terms = {k: out[k] for k in ('loss_image', 'loss_audio') if k in out}  # one of them for a uni-modal MAE
    loss = sum(getattr(args, f"{k.removeprefix('loss_')}_loss_weight") * v for k, v in terms.items())
    if args.contrast_weight:  # CAV-MAE's Eq. 7 on the mean of the visible tokens of the uni-modal streams
        streams = ('u_image', 'u_audio') if args.contrast_on == 'unimodal' else ('x_image', 'x_audio')
        terms['loss_contrast'], terms['contrast_acc'] = contrastive_loss(
            *(out[k].mean(1) for k in streams), args.contrast_tau, args.contrast_bidirectional, args.contrast_gather,
            args.contrast_batch)
        loss = loss + args.contrast_weight * terms['loss_contrast']
    return loss, terms


def knn_monitor(encoder, dataset, args, ctx, loader=None):
    """Fig. 3's probe: 1-NN leave-one-out accuracy of the pooled features on held-out clips, {'knn_image', ...}."""
    def fn(m, b):
        return {**pooled(m(b['image'], b['audio'])), 'label': b['label']}
    feats = training.predict(encoder, dataset, args, ctx, fn, loader)
    labels = feats.pop('label')
    return {k.replace('nn_', 'knn_'): round(v, 4) for k, v in metrics.nearest_neighbour_loo(feats, labels).items()}


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    """Pre-train: the data, the model and its monitors, then training.fit; returns the last log line."""
    args = parse_args(argv)
    with training.processes(args) as ctx:
        data = dict(skip_bad=args.skip_bad, synthetic_clips=args.synthetic_clips,
                    synthetic_classes=args.synthetic_classes)
        train_set = build_dataset(args.data, args.image_size, True, args.seed, 'train',
                                  speed_perturb=args.speed_perturb, device_frontend=args.device_frontend, **data)
        # Reconstructions are drawn for the first clips of held-out data (synthetic) or of the training clips.
        view_set = build_dataset(args.data, args.image_size, False, args.seed,
                                 'val' if args.data == 'synthetic' else 'train', **data)
        training.report_left_out([train_set], args, ctx)
        per_epoch = training.steps_per_epoch(len(train_set), args, ctx)  # no full step: stop now, before any work
        last_step = min(args.epochs * per_epoch, args.max_steps or args.epochs * per_epoch)
        eff = training.resolve_lr(args, ctx)
        mae = build_mae(args).to(ctx.device)
        if ctx.main:
            n_params = sum(p.numel() for p in mae.encoder.parameters())
            system = {'deepavfusion': f"{args.fusion} fusion, layers {args.fusion_layers}",
                      'cavmae': f"CAV-MAE, {args.joint_layers} joint layer(s)",
                      'avmae': f"Audiovisual MAE, {args.avmae_encoder} encoder ({args.joint_layers} joint layers "
                               f"if mid), {args.avmae_decoder} decoder, {args.avmae_objective}"}[args.system]
            print(f"pre-training: {args.preset} recipe ({system}, {args.modalities}, "
                  f"{n_params / 1e6:.1f}M encoder parameters, decoders {args.decoder_depth} x {args.decoder_dim}), "
                  f"data {args.data} ({len(train_set)} clips), {ctx.world} process(es) on {ctx.device}, amp "
                  f"{args.amp}, effective batch {eff}, lr {args.lr:.3g}, {args.epochs} epochs ({args.warmup_epochs:g}"
                  f" warm-up) -> {args.output_dir}", flush=True)
        # Branches initialised from MAE / AudioMAE start at learning rate 0 and ramp up (official code).
        ramp = [p for p, init in (('encoder.image.', args.image_init), ('encoder.audio.', args.audio_init)) if init]
        groups = training.param_groups(mae.named_parameters(), args.weight_decay, ramp_prefixes=ramp)
        knn_set = build_dataset(args.knn_data, args.image_size, False, args.seed, 'val', require=('label',), **data) \
            if args.knn_every else None
        knn_loader = training.eval_loader(knn_set, args, ctx, persistent=True) if knn_set is not None else None

        def on_checkpoint(model, step):  # before the first step, and after each epoch
            if ctx.main:
                out = Path(args.output_dir)
                if knn_set is not None and (step // per_epoch % args.knn_every == 0 or step == last_step):
                    knn = knn_monitor(model.encoder, knn_set, args, ctx, knn_loader)
                    training.append_log(out / 'log.jsonl', {'step': step, 'epoch': round(step / per_epoch, 4), **knn})
                plot_log(out / 'log.jsonl', out / 'loss_curve.png', title='pre-training')
                save_reconstructions(model, view_set, out / 'reconstructions.png', args.seed)

        train = WithMaskingNoise(train_set, (mae.encoder.image.num_patches, mae.encoder.audio.num_patches), args.seed)
        last = training.fit(args, ctx, mae, train, make_loss_fn(args), groups, on_checkpoint,
                            find_unused_parameters=args.modalities != 'image+audio'  # the other branch
                            or args.system == 'avmae' and args.avmae_objective in ('inpaint_image', 'inpaint_audio'))
        if ctx.main:
            print(f"done: step {last.get('step')}, loss {last.get('loss')}; wrote {args.output_dir}/checkpoint.pt, "
                  f"log.jsonl, loss_curve.png, reconstructions.png")
    return last


if __name__ == '__main__':
    main()
