"""Training throughput: tempsoft's loop vs a plain PyTorch loop, and what each speed-up is worth.

    python benchmarks/bench_train.py                       # CPU: ResNet-18, batch 64
    python benchmarks/bench_train.py --model cifar_cnn --batch-size 256 --batches 8 \
        --variants --threads 1,2 --repeats 3               # the CPU preset's CNN, every option
    python benchmarks/bench_train.py --batch-size 512 --batches 50      # a GPU
    tempsoft bench train -- --batches 3

Providers (same model from tempsoft.models, same initial weights, SGD momentum 0.9, random
uint8 images (N, 3, 32, 32) held in memory, 10 classes):
  plain        torch.utils.data.DataLoader over an in-memory dataset whose __getitem__ does
               the usual per-image random crop (4-pixel zero padding) + horizontal flip and
               the uint8 -> float conversion; F.cross_entropy(logits / T); float32, NCHW.
               Workers: 0 on the CPU (they would take cores from the model), min(8, cores)
               with pinned memory on a GPU.
  plain+amp    the plain loop with bf16 autocast and channels_last (on a GPU; on a CPU with
               --variants): how much of the gain is precision and layout alone.
  tempsoft     tempsoft.train.train(): DeviceLoader (whole dataset on the device, batched
               augmentation), tempsoft.cross_entropy, per-epoch diagnostics on, bf16 autocast
               + channels_last on a GPU (torch.compile with --compile).
With --variants (the CPU question "what helps here?"), tempsoft's loop is also run as
  tempsoft+cl            channels_last, fp32
  tempsoft+cl+bf16       channels_last and bf16 autocast (the head stays fp32)
  tempsoft+cl+bf16+compile   the same under torch.compile
and --threads 1,2 repeats everything at each torch thread count.

Images/s = images processed / wall time of the timed batches, after warm-up (the GPU is
synchronised before the clock stops). tempsoft's loop runs two epochs of --batches batches and
reports the second (the first is its warm-up). Each provider is measured --repeats times,
interleaved; the median is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tempsoft.data import ImageDataset  # noqa: E402
from tempsoft.models import build_model  # noqa: E402
from tempsoft.train import TrainConfig, train  # noqa: E402

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
T = 2.0          # any T: the loss costs the same at every temperature
PAD = 4


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def random_dataset(n: int, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageDataset(images=images, labels=labels, classes=[str(i) for i in range(10)],
                        name="random32", mean=CIFAR_MEAN, std=CIFAR_STD, flip_ok=True)


class PerImageDataset(torch.utils.data.Dataset):
    """What a plain loop does: transform one image at a time in __getitem__."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = F.pad(self.images[i], (PAD, PAD, PAD, PAD))
        top, left = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
        img = img[:, top:top + 32, left:left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img.float().div_(255.0), self.labels[i]


# --------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(data: ImageDataset, device: torch.device, batch_size: int, batches: int,
               warmup: int, workers: int, amp: bool, model_name: str = "resnet18") -> float:
    """Images/s of the plain loop over `batches` timed batches after `warmup` batches."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, mean=CIFAR_MEAN, std=CIFAR_STD).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        PerImageDataset(data.images, data.labels), batch_size=batch_size, shuffle=True,
        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0)
    model.train()
    it = iter(loader)
    start = None
    for step in range(warmup + batches):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float() / T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def tempsoft_loop(data: ImageDataset, device: torch.device, batch_size: int, batches: int,
                  compile_model: bool, model_name: str = "resnet18",
                  channels_last: Optional[bool] = None, amp: str = "auto") -> float:
    """Images/s of tempsoft.train.train's second epoch (the first is the warm-up)."""
    config = TrainConfig(dataset="cifar10", model=model_name, T=T, epochs=2,
                         batch_size=batch_size, lr=0.1, max_batches=batches,
                         device=str(device), compile=compile_model, progress=False,
                         channels_last=channels_last, amp=amp)
    result = train(config, train_set=data)
    return result.history[1]["images_per_s"]


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet18", help="a tempsoft.models name")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 64 on the CPU, 512 on a GPU")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches (default 4 on the CPU, 50 on a GPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="plain loop warm-up batches (default 1 CPU, 10 GPU)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile in tempsoft's loop")
    parser.add_argument("--variants", action="store_true",
                        help="also channels_last, bf16 and torch.compile, one at a time")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts to run at (default: as is)")
    args = parser.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch_size or (512 if gpu else 64)
    batches = args.batches or (50 if gpu else 4)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1)
                                                             if gpu else 0)
    # Enough images for warm-up + timed batches of both loops without wrapping around.
    data = random_dataset(batch * (max(warmup, batches) + batches + 1))
    name = args.model

    providers = {"plain": lambda: plain_loop(data, device, batch, batches, warmup, workers,
                                             amp=False, model_name=name)}
    if gpu or args.variants:
        providers["plain+amp"] = lambda: plain_loop(data, device, batch, batches, warmup,
                                                    workers, amp=True, model_name=name)
    providers["tempsoft"] = lambda: tempsoft_loop(data, device, batch, batches, args.compile,
                                                  name)
    if args.variants:
        providers["tempsoft+cl"] = lambda: tempsoft_loop(
            data, device, batch, batches, False, name, channels_last=True, amp="off")
        providers["tempsoft+cl+bf16"] = lambda: tempsoft_loop(
            data, device, batch, batches, False, name, channels_last=True, amp="bf16")
        providers["tempsoft+cl+bf16+compile"] = lambda: tempsoft_loop(
            data, device, batch, batches, True, name, channels_last=True, amp="bf16")

    thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                     else [torch.get_num_threads()])
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"# {name}, 32x32, batch {batch}, {batches} timed batches, {args.repeats} "
              f"repeat(s); {machine(device)}")
        # Repeats are interleaved (plain, tempsoft, plain, ...) so that a slow spell on a
        # shared machine hits every provider alike.
        rates: dict[str, list[float]] = {p: [] for p in providers}
        for _ in range(args.repeats):
            for provider, run in providers.items():
                rates[provider].append(run())
        results = {}
        for provider, runs in rates.items():
            results[provider] = statistics.median(runs)
            print(f"{provider:<26} {results[provider]:10.1f} images/s  "
                  f"{results[provider] / statistics.median(rates['plain']):5.2f}x plain   "
                  f"(runs: {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
