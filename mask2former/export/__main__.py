"""``python -m mask2former.export``: export the model of a config (MODEL.WEIGHTS loaded) to ONNX or
torch.export. Prints the file, its size and the export time; exit status 1 with the reason when
the model does not export."""
import argparse
import logging
import sys
from typing import Optional, Sequence

from ..config import get_cfg
from ..modeling import build_model
from .exporters import FORMATS, export_model
from .network import ExportError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mask2former.export", description=__doc__)
    p.add_argument("--config-file", required=True, metavar="FILE", help="the model's config (YAML)")
    p.add_argument("--format", choices=sorted(FORMATS), default="onnx",
                   help="onnx: standard ONNX operators (ONNX Runtime, OpenVINO); torch: a torch.export .pt2 program")
    p.add_argument("--output", required=True, metavar="PATH", help="the file to write (.onnx or .pt2)")
    p.add_argument("--height", type=int, default=None,
                   help="height of the traced example (any multiple of the size divisibility runs later)")
    p.add_argument("--width", type=int, default=None, help="width of the traced example")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. MODEL.WEIGHTS model_final.pkl")
    p.add_argument("opts_positional", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts_positional) + list(args.opts))
    cfg.freeze()
    expected = FORMATS[args.format]
    if not args.output.endswith(expected):
        print(f"error: --format {args.format} writes a {expected} file; got --output {args.output}", file=sys.stderr)
        return 2
    model = build_model(cfg)
    try:
        result = export_model(model, args.output, args.format, height=args.height, width=args.width, cfg=cfg)
    except (ExportError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result['path']} ({result['bytes'] / 2**20:.1f} MB) in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
