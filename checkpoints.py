"""Checkpoint files: reading them safely, naming what does not fit, and recognising what a downloaded file is.

    python checkpoints.py deepavfusion_vitb_as2m_ep200.pth     # which system and layout, the shapes and flags it
    python checkpoints.py mae_pretrain_vit_base.pth            # needs, and whether it loads strictly, or why not

It recognises this project's checkpoints (any system), the official DeepAVFusion releases, MAE-format ViTs (MAE's
image ViT, AudioMAE's time-first audio ViT, whose kernel `load_unimodal` transposes) and CAV-MAE's. Every file goes
through `read_checkpoint`: torch.load(weights_only=True) unless the user says otherwise.
"""
import argparse
import pickle
import sys
import zipfile

import torch


def read_checkpoint(path, weights_only=True):
    """torch.load of a checkpoint file, on the CPU; with `weights_only` (the default) never unpickled."""
    # With `weights_only` a file that holds more than tensors, numbers and strings is refused with a message saying so.
    try:
        return torch.load(path, map_location='cpu', weights_only=weights_only)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} not found") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True), it holds more than tensors "
                         f"({str(e).splitlines()[0]}). If you trust the file, load it with weights_only=False "
                         f"(--no-weights_only).") from None


def readable(path):
    """Whether a checkpoint file is whole (not truncated or damaged)."""
    # torch.save writes a zip, whose records' CRCs catch a bad copy (torch.load itself does not check them).
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def read_state_dict(source, weights_only=True):
    """A state dict from a path or a dict: unwraps 'state_dict' / 'model' and a DDP 'module.' prefix."""
    sd = source if isinstance(source, dict) else read_checkpoint(source, weights_only)
    for key in ('state_dict', 'model'):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{_name(source)}: not a state dict (expected a dict of tensors, possibly under "
                         f"'state_dict' or 'model')")
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def check_state_dict(module, sd, source, hint=''):
    """Raise one ValueError naming every missing, unexpected and wrongly shaped key, before loading anything."""
    own = module.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    for what, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if keys:
            more = f" ... and {len(keys) - 5} more" if len(keys) > 5 else ''
            problems.append(f"{len(keys)} {what}: {'; '.join(keys[:5])}{more}")
    if problems:
        raise ValueError(f"{_name(source)} does not fit this model. " + '. '.join(problems)
                         + (f". {hint}" if hint else ''))


def infer_config(sd):
    """The DeepAVFusionConfig fields that a DeepAVFusion encoder state dict's shapes fix ({} if it is not one)."""
    # They are the width, depth, patch, fusion type and layers, the fusion widths (where the two releases differ),
    # tokens, image size. Attention heads are not in the shapes (`heads`).
    if not all(k in sd for k in ('image.patch_embed.proj.weight', 'image.pos_embed', 'fusion_tokens')):
        return {}
    dim, _, p, _ = sd['image.patch_embed.proj.weight'].shape
    depth = len({k.split('.')[2] for k in sd if k.startswith('image.blocks.')})
    layers = sorted({int(k.split('.')[1]) for k in sd if k.startswith('fusion_blocks.')})
    c = dict(embed_dim=dim, depth=depth, patch_size=p, fusion='none', **heads(dim),
             mlp_ratio=sd['image.blocks.0.mlp.fc1.weight'].shape[0] / dim,
             image_size=round(sd['image.pos_embed'].shape[1] ** 0.5) * p,
             num_fusion_tokens=sd['fusion_tokens'].shape[1] - 16)  # 8 + 8 aggregation tokens, stored after
    if layers:
        blk = f'fusion_blocks.{layers[0]}.'
        kv = sd.get(blk + 'attn.kv.weight')
        c.update(fusion='factorized' if blk + 'attn.attn_v.q.weight' in sd else 'dense' if kv.shape[1] == 2 * dim
                 else 'token', fusion_layers='all' if layers == list(range(depth)) else '-'.join(map(str, layers)),
                 fusion_attn_ratio=sd[blk + 'attn.q.weight'].shape[0] / dim,
                 fusion_mlp_ratio=sd[blk + 'mlp.fc1.weight'].shape[0] / dim)
    return c


def heads(dim):
    """Attention heads, which no shape records: ViT-B's head width 64 (12 heads of 768)."""
    return dict(num_heads=max(1, dim // 64), fusion_num_heads=max(1, dim // 64))


def describe_checkpoint(sd):
    """What the encoder keys of a checkpoint say about its shape, to turn a mismatch into a useful hint."""
    c = infer_config(sd)
    order = ('embed_dim', 'depth', 'patch_size', 'fusion', 'fusion_layers', 'fusion_attn_ratio', 'fusion_mlp_ratio',
             'num_fusion_tokens', 'image_size')
    return ("The checkpoint looks like " + ', '.join(f"{k}={c[k]!r}" for k in order if k in c)
            + f", {sd['audio.pos_embed'].shape[1]} audio patches.") if c and 'audio.pos_embed' in sd else ''


def recognise(obj, source):
    """(system, layout, the encoder, a function that loads it strictly and returns the loaded module, the flags a
    run from it needs) of a checkpoint."""
    import finetune  # they import this file
    import model
    from cavmae import CAVMAEEncoder
    sd = read_state_dict(obj)
    enc = {k[len('encoder.'):]: v for k, v in sd.items() if k.startswith('encoder.')} or sd
    saved = obj.get('args') if isinstance(obj, dict) else None
    if isinstance(saved, dict) and 'preset' in saved:
        args = finetune.parse_args(['--task', 'linprobe', '--init', str(source)])
        module = finetune.build_encoder(args)
        return (args.system, f"this project's (preset {saved['preset']}, shape from its args)", module,
                lambda: module, f"--init {source}")
    if 'fusion_tokens' in enc:
        c = infer_config(enc)
        module = model.DeepAVFusion(model.get_config('base', **c))
        flags = ' '.join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in c.items()
                         if getattr(model.PRESETS['base'], k) != v)
        return ('deepavfusion', 'the official encoder (models/avmae.py)', module,
                lambda: module.load_checkpoint(enc) or module, f"--init {source} --preset base {flags}".rstrip())
    if 'patch_embed_a.proj.weight' in enc:
        dim = enc['patch_embed_v.proj.weight'].shape[0]
        joint = len({k.split('.')[1] for k in enc if k.startswith('blocks_u.')})
        depth = len({k.split('.')[1] for k in enc if k.startswith('blocks_v.')}) + joint
        module = CAVMAEEncoder(model.get_config('base', embed_dim=dim, depth=depth, fusion='none', **heads(dim)), joint)
        return ('cavmae', f"CAV-MAE's (cav_mae.py: {depth - joint} + {joint} joint layers)", module,
                lambda: module.load_checkpoint(enc) or module, f"--init {source} --system cavmae --preset base")
    if 'patch_embed.proj.weight' in enc and 'blocks.0.attn.qkv.weight' in enc:
        dim, chans = enc['patch_embed.proj.weight'].shape[:2]
        branch = 'image' if chans == 3 else 'audio'
        depth = len({k.split('.')[1] for k in enc if k.startswith('blocks.')})
        module = model.DeepAVFusion(model.get_config('base', embed_dim=dim, depth=depth, fusion='none', **heads(dim)))
        layout = ("AudioMAE's ViT: (time, frequency) patches, its kernel transposed on loading "
                  "(--audio_init_layout as_is: unchanged)" if model.is_audiomae(enc) else f"an MAE-format {branch} ViT")
        return (f'{branch} branch', layout, module,
                lambda: module.load_unimodal(branch, enc) or getattr(module, branch), f"--{branch}_init {source}")
    raise ValueError(f"{source}: not a layout this project reads (first keys: {', '.join(list(sd)[:5])})")


def inspect(source, weights_only=True):
    """Read a checkpoint through the project's reader, recognise it and load it strictly: a report of the system
    and layout, the encoder's shape, the flags a run from it needs, the tensors loaded, or why it was refused."""
    obj = read_checkpoint(source, weights_only)
    system, layout, module, load, flags = recognise(obj, source)
    c = module.config
    fields = ('embed_dim', 'depth', 'fusion') + (('fusion_layers', 'fusion_attn_ratio', 'fusion_mlp_ratio')
                                                 if c.fusion != 'none' else ())
    report = dict(system=system, layout=layout, flags=flags, error=None, shape={k: getattr(c, k) for k in fields})
    try:
        loaded = load().state_dict()
        report['loaded'] = len(loaded)
        report['left_out'] = [k for k in read_state_dict(obj) if k.removeprefix('encoder.') not in loaded]
    except ValueError as e:
        report['error'] = str(e).replace('the given state dict', str(source))
    return report


def main(argv=None):
    """`python checkpoints.py FILE`: print what the file is and whether it loads; exit status 1 if refused."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint')
    p.add_argument('--weights_only', action=argparse.BooleanOptionalAction, default=True,
                   help='torch.load(weights_only=True) (default); --no-weights_only only for files you trust')
    args = p.parse_args(argv)
    r = inspect(args.checkpoint, args.weights_only)
    print(f"{args.checkpoint}: {r['system']}, {r['layout']}\n  shape: "
          + ', '.join(f"{k}={v}" for k, v in r['shape'].items()))
    if r['error']:
        print(f"  refused: {r['error']}")
    else:
        left = r['left_out']
        print(f"  loads strictly: {r['loaded']} tensors matched, none missing, none unexpected; "
              f"{len(left)} of the file's not used (decoders, mask and class tokens){': ' if left else ''}"
              f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")
        print(f"  start from it with: {r['flags']}")
    return r


if __name__ == '__main__':
    sys.exit(1 if main()['error'] else 0)


def _name(source):
    return 'the given state dict' if isinstance(source, dict) else str(source)
