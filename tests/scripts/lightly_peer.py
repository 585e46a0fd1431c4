"""The peer rows of the real-image table (a script, not a test): SimCLR and DINO trained the way lightly's own
CIFAR-10 benchmark trains them (lightly 1.6, docs/source/getting_started/benchmarks/cifar10_benchmark.py), written
with lightly's losses, heads and transforms, and saved as a checkpoint that eval_linear.py scores exactly as it
scores this project's runs. Called by `tests/scripts/real_images.py --peer lightly` with the same budget flags as
the project's rows; lightly is a benchmark-only dependency (pip install lightly).

As in lightly's benchmark: SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0) and NTXentLoss
(temperature 0.5) with a 2-layer SimCLRProjectionHead(feat, feat, 128); DINOTransform(global_crop_size=32,
n_local_views=0, cj_strength=0.5, gaussian_blur=(0, 0, 0)) with a 2-layer DINOProjectionHead (hidden 2048, BN,
bottleneck 256, K 2048), a teacher head built anew (not copied), DINOLoss(output_dim=2048) and momentum 0.99 on
every step; SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4 on all parameters, CosineAnnealingLR stepped
per epoch, no warm-up; ImageNet normalisation; DataLoader with workers, one forward per view; the student backbone is
the one evaluated (lightly's kNN uses it).
Where it differs from lightly's file, and why: the backbone is this project's ResNet-18 (--width, CIFAR stem) instead
of lightly's ResNetGenerator, so the comparison is backbone-equal; the data are the same images and the same fixed
subset (--num-train) as the project's rows; plain PyTorch loop instead of PyTorch Lightning (no kNN callback during
training); the checkpoint stores the ImageNet mean/std it trained with, so eval_linear.py normalises as training did.
No resume: an interrupted peer run starts again.
"""
import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import common  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", dest="method", choices=("simclr", "dino"), required=True)
    for flag, kind in (("--data-dir", str), ("--image-size", int), ("--num-train", int), ("--epochs", int),
                       ("--batch-size", int), ("--width", int), ("--out-dir", str), ("--device", str)):
        p.add_argument(flag, type=kind, required=flag in ("--data-dir", "--out-dir"))
    p.set_defaults(image_size=32, num_train=0, epochs=10, batch_size=128, width=16, device="auto")
    args, _ = p.parse_known_args()  # the project's other budget flags (--warmup-epochs, --eval-every...) do not apply
    return args


def main(args):
    from lightly.loss import DINOLoss, NTXentLoss
    from lightly.models.modules import heads
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import DINOTransform, SimCLRTransform
    from lightly.transforms.utils import IMAGENET_NORMALIZE
    from PIL import Image
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(0)
    train = common.subset(common.get_dataset("folder", args.data_dir, "train", image_size=args.image_size),
                          args.num_train)  # the same fixed subset as the project's rows
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in train.images]
    backbone, dim = common.build_backbone("resnet18", args.image_size, args.width)
    if args.method == "simclr":
        transform = SimCLRTransform(input_size=args.image_size, cj_strength=0.5, gaussian_blur=0.0)
        head, criterion = heads.SimCLRProjectionHead(dim, dim, 128), NTXentLoss()
    else:
        transform = DINOTransform(global_crop_size=args.image_size, n_local_views=0, cj_strength=0.5,
                                  gaussian_blur=(0, 0, 0))

        def dino_head():  # lightly's benchmark: "use only 2 layers for cifar10"
            h = heads.DINOProjectionHead(dim, 2048, 256, 2048, batch_norm=True)
            h.layers = heads.ProjectionHead([(dim, 2048, nn.BatchNorm1d(2048), nn.GELU()), (2048, 256, None, None)]).layers
            return h
        head, criterion = dino_head(), DINOLoss(output_dim=2048)
        teacher = nn.Sequential(copy.deepcopy(backbone), dino_head()).to(device)
        deactivate_requires_grad(teacher)
    student = nn.Sequential(backbone, head).to(device)
    optim = torch.optim.SGD(student.parameters(), lr=6e-2 * args.batch_size / 128, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, args.epochs)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(images[i]), 0

    loader = torch.utils.data.DataLoader(Data(), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=min(8, os.cpu_count() or 1), persistent_workers=True)
    t = time.time()
    for epoch in range(args.epochs):
        total = 0.0
        for views, _ in loader:
            views = [v.to(device) for v in views]
            if args.method == "simclr":
                loss = criterion(student(views[0]), student(views[1]))
            else:
                update_momentum(student, teacher, m=0.99)
                teacher_out = [teacher(v) for v in views[:2]]
                loss = criterion(teacher_out, [student(v) for v in views], epoch=epoch)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item()
        sched.step()
        print(f"epoch {epoch + 1} loss {total / len(loader):.4f} ({time.time() - t:.0f} s)", flush=True)
    saved = {"method": f"lightly-{args.method}", "arch": "resnet18", "width": args.width, "dataset": "folder",
             "data_dir": args.data_dir, "image_size": args.image_size, "seed": 0, "pool": "cls", "patch_size": None,
             "mean": IMAGENET_NORMALIZE["mean"], "std": IMAGENET_NORMALIZE["std"]}
    os.makedirs(args.out_dir, exist_ok=True)
    common.save_checkpoint(os.path.join(args.out_dir, "last.pt"),
                           {"args": saved, "epoch": args.epochs, "backbone": backbone.state_dict()})


if __name__ == "__main__":
    main(get_args())
