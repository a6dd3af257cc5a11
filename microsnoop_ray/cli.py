"""The ``microsnoop-ray`` command: thin argument parsing around the library.

Every error about an input prints one line naming the file (or plate/well/site)
and the problem, and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import MicrosnoopError

log = logging.getLogger("microsnoop_ray")


def _cmd_embed(args: argparse.Namespace) -> int:
    import pandas as pd

    from .encode import Encoder, check_images, embed, feature_names
    from .io.arrays import read_image_stack, read_metadata_table
    from .io.write import profile_table, write_parquet

    images, meta = read_image_stack(args.input)
    n, c = check_images(images, str(args.input))
    names = args.channel_names.split(",") if args.channel_names else [f"ch{i}" for i in range(c)]
    if len(names) != c or len(set(names)) != c or not all(names):
        raise MicrosnoopError(f"{args.input}: --channel-names gives {len(names)} distinct non-empty names "
                              f"for {c} channels: {args.channel_names!r}")
    if args.metadata:
        meta = pd.concat([meta, read_metadata_table(args.metadata, n)], axis=1)
    compile_ = args.compile if args.compile is not None else n * c >= 512
    encoder = Encoder(args.weights, device=args.device, compile=compile_)
    t0 = time.perf_counter()
    feats = embed(images, batch_size=args.batch_size, normalization=args.normalization,
                  source=str(args.input), progress=not args.quiet and n >= 64, encoder=encoder)
    seconds = time.perf_counter() - t0
    meta.insert(0, "Metadata_ImageIndex", range(n))
    table = profile_table(meta, feats, feature_names(names))
    card = encoder.model_card
    write_parquet(table, args.out, provenance={
        "command": "embed", "input": str(args.input), "channels": names,
        "model_card": card.to_dict() if card else None, "normalization": args.normalization,
    })
    if not args.quiet:
        print(f"embedded {n} images x {c} channels with {card.model_id if card else 'model'} "
              f"in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s) -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microsnoop-ray", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed images up to 224x224 (cells, crops) into a Parquet table")
    e.add_argument("input", type=Path, help=".npy, .npz (key 'images') of shape (N, C, H, W), or a folder of TIFFs")
    e.add_argument("--weights", type=Path, default=None,
                   help="checkpoint (published .pth, state dict, or microsnoop-ray format); default: shipped weights")
    e.add_argument("--out", type=Path, required=True, help="output .parquet")
    e.add_argument("--channel-names", default=None, help="comma-separated, one per channel (default ch0,ch1,...)")
    e.add_argument("--metadata", type=Path, default=None, help="CSV/Parquet with one row per image (Metadata_ columns)")
    e.add_argument("--batch-size", type=int, default=32, help="one-channel images per forward pass")
    e.add_argument("--device", default=None, help="cpu (default) or cuda")
    e.add_argument("--normalization", choices=("default", "faithful"), default="default",
                   help="degenerate-case handling of percentile normalisation (see docs)")
    e.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoder (default: on when there are >= 512 one-channel images)")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_cmd_embed)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MicrosnoopError as exc:
        print(f"microsnoop-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"microsnoop-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
