"""Estimated FreezeOut saving for given pretraining flags (FLOP counts, not wall time).

    python estimate_speedup.py --model MIM_vit_base_patch16 --how_scale cubic --t_0 0.8

Prints the GPU work per image of a plain step and the average over the FreezeOut schedule, for
both decoder modes. --help lists the flags that matter here; run_pretrain.py's others are
accepted (and checked as it checks them), so a pretraining command can be pasted as it is.
"""
from __future__ import annotations

import util.startup  # noqa: F401 - first: a Ctrl-C during the imports ends quietly
import dataclasses
import json

import models_mim
from run_pretrain import check_args, get_args_parser
from util import flops
from util.cli import ArgumentParser, help_only_for
from util import freezeout as fo
from util.runtime import check_number_flags


def estimate(model: str, input_size: int, mask_ratio: float, hog_nbins: int, t_0: float, how_scale: str,
             decoder_freeze: str) -> dict:
    if model not in flops.SHAPES:
        raise SystemExit(f'error: no FLOP model for {model}; known: {", ".join(flops.SHAPES)}')
    models_mim.check_model(model, input_size)
    shape = dataclasses.replace(flops.SHAPES[model], img_size=input_size, mask_ratio=mask_ratio,
                                hog_nbins=hog_nbins)
    return flops.freezeout_speedup(shape, t_0, how_scale, decoder_freeze)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(parents=[get_args_parser()], add_help=False, description=__doc__,
                            conflict_handler='resolve')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    # epochs and warmup: run_pretrain's checks (a first freeze inside the warmup) read them
    help_only_for(parser, {'model', 'input_size', 'mask_ratio', 'hog_nbins', 't_0', 'how_scale', 'epochs',
                           'warmup_epochs', 'json'})
    args = parser.parse_args(argv)
    if args.t_0 is None:
        raise SystemExit('error: give --t_0 (and --how_scale) to estimate a FreezeOut run')
    check_number_flags(args)
    check_args(args)  # run_pretrain's checks, so a config it would refuse is not estimated
    result = {mode: estimate(args.model, args.input_size, args.mask_ratio, args.hog_nbins, args.t_0,
                             args.how_scale, mode) for mode in fo.DECODER_FREEZE_MODES}
    if args.json:
        print(json.dumps(result))
        return result
    print(f'{args.model} at {args.input_size}px, mask {args.mask_ratio}, {args.how_scale} t_0={args.t_0} '
          f'(FLOP estimate; backward = 2x forward, 1x for the patch embedding; frozen layers forward only)')
    print(f'{"decoders":>9} {"plain GFLOP/img":>16} {"FreezeOut avg":>14} {"saving":>7} {"speedup":>8}')
    for mode, r in result.items():
        print(f'{mode:>9} {r["plain_gflops_per_image"]:>16.2f} {r["average_gflops_per_image"]:>14.2f} '
              f'{r["saving"]:>7.1%} {r["speedup"]:>7.2f}x')
    return result


if __name__ == '__main__':
    util.startup.run_tool(main)
