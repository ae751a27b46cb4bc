"""Images/s of the bare model step vs the real training loop, at the same backbone, batch, size and precision.

Bare step: forward, loss, backward and AdamW step on one pre-normalised batch held in memory (what the network alone
costs). Real loop: `kneeoa.stages.train`'s Lightning module and loaders (decoded uint8 cache -> batch fetch ->
batch augmentation -> normalisation, in `cnn.num_workers` worker processes), over a run folder's manifest or
random images. The ratio says how far the loop is from data-bound; the target is >= 0.95.

    .venv/bin/python bench/train_throughput.py --backbone twobranch --size 224 --batch 64 [--run runs/kl]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def bare_step_rate(net, hp, batch: int, size: int, steps: int, channels_last: bool) -> float:
    from kneeoa.models.heads import HEADS

    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    x = torch.randn(batch, 1, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,))
    head = HEADS.get(hp.klg_head)
    net.train()
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = head.loss(net(x)["klg"].float(), y, torch.ones(5), 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def loop_rate(net, hp, images: np.ndarray, labels: np.ndarray, steps: int, channels_last: bool) -> float:
    import lightning as L

    from kneeoa.data.dataset import KneeDataset
    from kneeoa.stages.train import _make_module, training_loaders

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.t1 = time.perf_counter()

    ds = KneeDataset(images, np.arange(len(images)), {"klg": labels})
    dl, _ = training_loaders(ds, ds, hp, seed=0, mean=0.5, std=0.25, hflip=False, channels_last=channels_last)
    module = _make_module(net, {"klg": torch.ones(5)}, hp, steps_per_epoch=len(dl))
    clock = Clock()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps + 2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], accelerator="cpu", precision=hp.precision)
    trainer.fit(module, dl)
    return hp.batch_size * steps / (clock.t1 - clock.t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="twobranch")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare / loop measurements")
    ap.add_argument("--head", default="corn")
    ap.add_argument("--policy", default="strong")
    ap.add_argument("--no-augment", action="store_true", help="cnn.augment: false (what augmentation costs)")
    ap.add_argument("--workers", type=int, default=None, help="cnn.num_workers (default: the config default)")
    ap.add_argument("--run", default=None, help="run folder whose manifest images feed the real loop (else random)")
    args = ap.parse_args()

    from kneeoa.config import CnnCfg
    from kneeoa.models.cnn import BACKBONES, MultiTaskNet, create_backbone
    from kneeoa.stages.train import resolve_precision

    hp = CnnCfg(image_size=args.size, batch_size=args.batch, klg_head=args.head, augment_policy=args.policy)
    hp.augment = not args.no_augment
    if args.workers is not None:
        hp.num_workers = args.workers
    hp.precision = resolve_precision(hp.precision, hp.accelerator)
    channels_last = BACKBONES.get(args.backbone).channels_last
    n = args.batch * (args.steps + 3)
    if args.run:
        from kneeoa.data.cache import image_cache
        from kneeoa.data.manifest import read_manifest

        manifest = read_manifest(args.run)
        images = image_cache(args.run, manifest, args.size)
        labels = manifest["klg"].fillna(-1).to_numpy(dtype="int64")
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, args.size, args.size), dtype=np.uint8)
        labels = rng.integers(0, 5, n)

    def fresh():
        torch.manual_seed(0)
        net = MultiTaskNet(create_backbone(args.backbone, source=None)[0], {"klg": 5}, {"klg": args.head})
        return net.to(memory_format=torch.channels_last) if channels_last else net

    # Alternate the two measurements: a CPU's clock drifts under sustained load, which would bias whichever ran last.
    bare, loop = [], []
    for _ in range(args.rounds):
        bare.append(bare_step_rate(fresh(), hp, args.batch, args.size, args.steps, channels_last))
        loop.append(loop_rate(fresh(), hp, images, labels, args.steps, channels_last))
    print(f"backbone {args.backbone}, {args.size} px, batch {args.batch}, precision {hp.precision}, "
          f"augmentation {args.policy if hp.augment else 'off'}, threads {torch.get_num_threads()}, loader workers "
          f"{hp.num_workers}, {args.rounds} alternating rounds of {args.steps} steps")
    print(f"bare model step: {np.mean(bare):7.1f} images/s  ({', '.join(f'{r:.0f}' for r in bare)})")
    print(f"training loop:   {np.mean(loop):7.1f} images/s  ({', '.join(f'{r:.0f}' for r in loop)})")
    print(f"ratio loop/bare: {np.mean(loop) / np.mean(bare):.3f}")


if __name__ == "__main__":
    main()
