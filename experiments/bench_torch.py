"""The learners of bench_learner.py in PyTorch, trained the same way, for a side-by-side ratio.

PyTorch is not a dependency of jax-seqgcn: `available()` says whether it is importable, and
bench_learner.py skips this part when it is not. The models are the reference implementation's
(small CNN of the CPU-scale protocol; CIFAR ResNet-18 with BasicBlocks, no max-pool, 4x4 average
pool), trained like `jax_seqgcn.training.fit.fit`: SGD lr 0.1, momentum 0.9, coupled weight decay 5e-4,
softmax cross-entropy, a reshuffle per epoch, `drop_last=False`. Inputs are the same random uint8
images, turned into float tensors once (a DataLoader's per-image Python work would only slow
PyTorch down); CIFAR-style augmentation (random crop from a 4-pixel zero padding + horizontal
flip) is done per batch with tensor ops, then `(x - mean) / std`, as jax-seqgcn does on device.

  python experiments/bench_torch.py [--learner resnet18 --batch_size 128 --examples 1024
      --augment]   # prints one JSON record like bench_learner.py's
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time

import numpy as np

# Image shape [H, W, C] of each learner's benchmark case (bench_learner.py's CASES use these).
IMAGE_SHAPES = {"small_cnn": (28, 28, 1), "resnet18": (32, 32, 3)}


def available() -> bool:
  """True if PyTorch can be imported."""
  return importlib.util.find_spec("torch") is not None


def _models():
  import torch
  from torch import nn
  from torch.nn import functional as F

  class SmallCNN(nn.Module):

    def __init__(self, channels=1, num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
      self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
      self.fc1 = nn.Linear(64 * 7 * 7, 128)
      self.head = nn.Linear(128, num_classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.relu(self.conv2(x)), 2)
      return self.head(F.relu(self.fc1(torch.flatten(x, 1))))

  class BasicBlock(nn.Module):

    def __init__(self, in_planes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

  class ResNet18(nn.Module):

    def __init__(self, channels=3, num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      layers, in_planes = [], 64
      for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
          layers.append(BasicBlock(in_planes, planes, s))
          in_planes = planes
      self.layers = nn.Sequential(*layers)
      self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
      out = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.linear(torch.flatten(F.avg_pool2d(out, 4), 1))

  return {"small_cnn": SmallCNN, "resnet18": ResNet18}


def bench(name: str, batch_size: int, *, num_examples: int, epochs: int, shape, augment: bool,
          seed: int = 0, threads: int = 0) -> dict:
  """Trains the PyTorch `name` for 1 + `epochs` epochs on random data; times the last ones.

  Args:
    name: "small_cnn" or "resnet18".
    batch_size: training batch size.
    num_examples: examples per epoch.
    epochs: timed epochs (one untimed warm-up epoch runs first).
    shape: (H, W, C) of an image.
    augment: CIFAR-style random crop + flip and normalisation per batch.
    seed: data and initialisation seed.
    threads: `torch.set_num_threads` (0 = PyTorch's default).
  Returns:
    A record with images/s and ms/step, like bench_learner's.
  """
  import torch
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples,) + tuple(shape), dtype=np.uint8)
  labels = torch.from_numpy(rng.integers(0, 10, num_examples).astype(np.int64))
  x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255).contiguous()
  mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
  std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
  model = _models()[name](channels=shape[-1])
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
  loss_fn = torch.nn.CrossEntropyLoss()
  height, width = shape[0], shape[1]

  def batch(indices):
    x = x_all[indices]
    if augment:
      padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
      i, j = np.random.randint(0, 9, 2)
      x = padded[:, :, i:i + height, j:j + width]
      flip = torch.rand(x.shape[0]) < 0.5
      x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
      x = (x - mean) / std
    return x, labels[indices]

  stamps = []
  start = time.perf_counter()
  for _ in range(1 + epochs):
    for indices in torch.randperm(num_examples).split(batch_size):
      x, y = batch(indices)
      opt.zero_grad(set_to_none=True)
      loss_fn(model(x), y).backward()
      opt.step()
    stamps.append(time.perf_counter())
  epoch_seconds = np.diff(stamps)
  steps = -(-num_examples // batch_size)
  return {
      "learner": name,
      "framework": f"torch {torch.__version__}",
      "threads": torch.get_num_threads(),
      "batch_size": batch_size,
      "examples_per_epoch": num_examples,
      "first_epoch_s": round(stamps[0] - start, 2),
      "epoch_s": [round(float(s), 3) for s in epoch_seconds],
      "images_per_s": round(num_examples * len(epoch_seconds) / float(np.sum(epoch_seconds)), 1),
      "ms_per_step": round(1e3 * float(np.sum(epoch_seconds)) / (steps * len(epoch_seconds)), 1),
  }


def bench_in_subprocess(name: str, batch_size: int, *, num_examples: int, epochs: int,
                        augment: bool, timeout: float = 3600) -> dict:
  """`bench` in a fresh Python process (this file run as a script); returns its record.

  bench_learner.py measures PyTorch this way: in one process the two frameworks' thread pools
  and allocators outlive their runs and slow down whichever framework runs next (measured: the
  same small-CNN case, repeated in one process after PyTorch had run, went from 3,400 to 2,900
  images/s for jax-seqgcn and from 2,950 to 3,940 for PyTorch).
  """
  command = [sys.executable, __file__, "--learner", name, "--batch_size", str(batch_size),
             "--examples", str(num_examples), "--epochs", str(epochs)]
  if augment:
    command.append("--augment")
  # The malloc settings of this process too (the huge pages of bench_learner's restart, which
  # the restarted process no longer passes on by itself): PyTorch gains from them as we do.
  from jax_seqgcn.runtime import host_memory  # pylint: disable=import-outside-toplevel
  out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                       env=host_memory.environ_with_process_tunables())
  if out.returncode != 0:
    raise RuntimeError(f"bench_torch.py failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
  return json.loads(out.stdout)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--learner", choices=sorted(IMAGE_SHAPES), default="small_cnn")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--examples", type=int, default=4096)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--augment", action="store_true",
                      help="CIFAR-style crop + flip + normalisation (bench_learner's resnet18)")
  args = parser.parse_args()
  print(json.dumps(bench(args.learner, args.batch_size, num_examples=args.examples,
                         epochs=args.epochs, shape=IMAGE_SHAPES[args.learner],
                         augment=args.augment), indent=2))


if __name__ == "__main__":
  main()
