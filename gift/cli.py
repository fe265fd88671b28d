"""The ``gift`` command line (``python -m gift``)."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """A short forward/backward/AdamW run of a GIFT-wrapped ViT on project-made images, offline."""
    import time

    import timm
    import torch
    from tqdm import tqdm

    import gift

    torch.manual_seed(args.seed)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    model = gift.GIFTReference(backbone, gift.GIFTConfig(rank=args.rank))
    print(f"{args.model} (random init, nothing downloaded) wrapped with GIFT, block=paca, rank={args.rank}\n")
    print(model.parameter_table(), "\n")
    size = backbone.pretrained_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(args.batch_size, *size)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for step in tqdm(range(args.steps), desc="train steps"):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tqdm.write(f"step {step}: loss {loss.item():.4f}  ({time.perf_counter() - start:.2f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gift", description="GIFT fine-tuning for timm Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="short offline training run of a GIFT-wrapped ViT (what `make demo` runs)")
    demo.add_argument("--model", default="vit_tiny_patch16_224")
    demo.add_argument("--rank", type=int, default=16)
    demo.add_argument("--steps", type=int, default=3)
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--num-classes", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
