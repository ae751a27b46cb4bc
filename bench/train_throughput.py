"""Images/s of the bare model step vs the real training loop, at the same backbone, batch, size and precision.

Bare step: forward, loss, backward and AdamW step on one pre-normalised batch held in memory (what the network alone
costs). Real loop: `kneeoa.stages.train`'s Lightning module and loaders (decoded uint8 cache -> batch fetch ->
batch augmentation -> normalisation, in `cnn.num_workers` worker processes), over a run folder's manifest or
random images. The two are timed alternately, one step each (`paired_times`), and compared by their median step
times. The ratio says how far the loop is from data-bound; the target is >= 0.95.

    .venv/bin/python bench/train_throughput.py --config examples/kneekl224.yaml --steps 60 [--run runs/kneekl224]

`--config` takes the network and its training settings (backbone, size, batch, head, augmentation) from a study
config; flags given beside it override those settings.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def bare_step(net, hp, batch: int, size: int, channels_last: bool):
    """A function doing one bare training step (forward, loss, backward, AdamW) on a fixed pre-normalised batch."""
    from kneeoa.models.cnn.heads import HEADS

    opt = torch.optim.AdamW(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    x = torch.randn(batch, 1, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,))
    head = HEADS.get(hp.klg_head)
    net.train()

    def step() -> None:
        loss = head.loss(net(x)["klg"].float(), y, torch.ones(5), 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


class ReadyBatch:
    """collate_fn that prepares the first batch and hands its images back ever after (with each batch's labels): the
    real loop with no data work left, to tell Lightning's own per-step cost from the data path's."""

    def __init__(self, collate) -> None:
        self.collate, self.x = collate, None

    def __call__(self, batch):
        x, y = self.collate(batch) if self.x is None else (self.x, batch[1])
        self.x = x
        return x, y


def paired_times(loop_net, bare_net, hp, images: np.ndarray, labels: np.ndarray, steps: int,
                 channels_last: bool, ready_batch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per step of the real loop and of the bare step, measured alternately, step by step.

    After each loop step a bare step runs, timed on its own; a loop step's time is the time from one batch start to
    the next (fetch, augmentation, step, Lightning's own work) less the bare step in between. Pairing at step level
    cancels the clock drift and the neighbours' load of a shared machine, which swing whole runs by +-15 %.
    """
    import lightning as L

    from kneeoa.models.cnn.backbones import input_rows
    from kneeoa.models.cnn.training import make_module
    from kneeoa.stages.train import training_loaders
    from kneeoa.transforms.dataset import KneeDataset
    from kneeoa.transforms.preprocess import Preprocess

    step = bare_step(bare_net, hp, hp.batch_size, hp.image_size, channels_last)

    class Paired(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.bare: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            t0 = time.perf_counter()
            step()
            self.bare.append(time.perf_counter() - t0)

    ds = KneeDataset(images, np.arange(len(images)), {"klg": labels})
    pre = Preprocess.for_cnn(hp.image_size, 0.5, 0.25, in_chans=1)
    dl, _ = training_loaders(ds, ds, hp, seed=0, pre=pre, hflip=False, channels_last=channels_last,
                             rows=input_rows(loop_net.backbone, hp.image_size))
    if ready_batch:
        dl.collate_fn = ReadyBatch(dl.collate_fn)
    module = make_module([loop_net], {"klg": torch.ones(5)}, hp, steps_per_epoch=len(dl))
    clock = Paired()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps + 3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], accelerator="cpu", precision=hp.precision)
    trainer.fit(module, dl)
    starts, bare = np.array(clock.starts), np.array(clock.bare)
    loop = np.diff(starts) - bare[:-1]
    return loop[2:], bare[2:-1]  # the first two steps warm up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="study config whose cnn section sets everything below")
    ap.add_argument("--backbone", default=None, help="default: the config's first backbone, else twobranch")
    ap.add_argument("--size", type=int, default=None, help="default: the config's, else 224")
    ap.add_argument("--batch", type=int, default=None, help="default: the config's, else 64")
    ap.add_argument("--steps", type=int, default=60, help="paired loop / bare steps measured")
    ap.add_argument("--head", default=None, help="default: the config's, else corn")
    ap.add_argument("--policy", default=None, help="default: the config's, else strong")
    ap.add_argument("--group", type=int, default=None, help="cnn.augment_group (default: the config's, else 1)")
    ap.add_argument("--no-augment", action="store_true", help="cnn.augment: false (what augmentation costs)")
    ap.add_argument("--ready-batch", action="store_true",
                    help="feed the loop one prepared batch over and over (what the loop costs without data work)")
    ap.add_argument("--workers", type=int, default=None, help="cnn.num_workers (default: the config default)")
    ap.add_argument("--run", default=None, help="run folder whose manifest images feed the real loop (else random)")
    args = ap.parse_args()

    from kneeoa.config import CnnCfg
    from kneeoa.config_checks import load_config
    from kneeoa.models.cnn.backbones import BACKBONES, MultiTaskNet, create_backbone
    from kneeoa.models.cnn.training import resolve_precision

    hp = (load_config(args.config).cnn if args.config
          else CnnCfg(batch_size=64, klg_head="corn", augment_policy="strong", backbones=["twobranch"]))
    for flag, key in (("size", "image_size"), ("batch", "batch_size"), ("head", "klg_head"),
                      ("policy", "augment_policy"), ("group", "augment_group")):
        if getattr(args, flag) is not None:
            setattr(hp, key, getattr(args, flag))
    backbone, size, batch = args.backbone or hp.backbones[0], hp.image_size, hp.batch_size
    hp.augment = hp.augment and not args.no_augment
    if args.workers is not None:
        hp.num_workers = args.workers
    hp.precision = resolve_precision(hp.precision, hp.accelerator)
    channels_last = BACKBONES.get(backbone).channels_last
    n = batch * (args.steps + 4)
    if args.run:
        from kneeoa.sources.manifest import read_manifest
        from kneeoa.transforms.cache import image_cache

        manifest = read_manifest(args.run)
        images = image_cache(args.run, manifest, size)
        labels = manifest["klg"].fillna(-1).to_numpy(dtype="int64")
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 5, n)

    def fresh():
        torch.manual_seed(0)
        net = MultiTaskNet(create_backbone(backbone, source=None, args=hp.backbone_args)[0], {"klg": 5},
                           {"klg": hp.klg_head})
        return net.to(memory_format=torch.channels_last) if channels_last else net

    loop, bare = paired_times(fresh(), fresh(), hp, images, labels, args.steps, channels_last, args.ready_batch)
    augmentation = f"{hp.augment_policy}, group {hp.augment_group}" if hp.augment else "off"
    augmentation += ", one ready batch" if args.ready_batch else ""
    print(f"backbone {backbone}, {size} px, batch {batch}, precision {hp.precision}, "
          f"augmentation {augmentation}, threads {torch.get_num_threads()}, loader workers "
          f"{hp.num_workers}, {len(loop)} paired steps")
    for name, t in (("bare model step", bare), ("training loop", loop)):
        q1, q3 = np.percentile(t, [25, 75])
        print(f"{name + ':':17s}{batch / np.median(t):7.1f} images/s  (median {1000 * np.median(t):.0f} ms/step, "
              f"quartiles {1000 * q1:.0f}-{1000 * q3:.0f})")
    ratios = bare / loop
    print(f"ratio loop/bare: {np.median(bare) / np.median(loop):.3f} (median step times); per-step ratios median "
          f"{np.median(ratios):.3f}, quartiles {np.percentile(ratios, 25):.3f}-{np.percentile(ratios, 75):.3f}")


if __name__ == "__main__":
    main()
