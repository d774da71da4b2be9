"""Train an MLP and a small CNN on a worker, with an ordinary PyTorch training loop.

The data is synthetic (28x28 "digits": one bright stroke pattern per class, plus noise), so nothing
is downloaded. With no argument the worker runs in this process; give a URL to use another one:

    python examples/train_mnist_like.py [ws://HOST:PORT] [--epochs N]
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.zeros(10, 28, 28)
    for c in range(10):
        patterns[c, 4 + 2 * c: 6 + 2 * c, 4:24] = 1.0      # a horizontal stroke, one row per class
        patterns[c, 4:24, 23 - 2 * c: 25 - 2 * c] = 0.5   # and a vertical one
    labels = torch.randint(0, 10, (n,), generator=g)
    images = patterns[labels] + 1.5 * torch.randn(n, 28, 28, generator=g)
    return images.unsqueeze(1), labels


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.LayerNorm(128), nn.GELU(),
                                 nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def fit(model, batches, test, epochs: int, name: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(1, epochs + 1):
        model.train()
        start, total = time.perf_counter(), 0.0
        for i, (x, y) in enumerate(batches, 1):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
            print(f"\r{name} epoch {epoch}/{epochs}  batch {i}/{len(batches)}  loss {total / i:.3f}",
                  end="", flush=True)
        model.eval()
        with torch.no_grad():
            accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
        print(f"  test accuracy {accuracy:.1%}  ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="a running worker (default: start one in this process)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    server = None if args.url else tr.start_worker(id="trainer")
    worker = tr.connect(args.url or server.url)
    print(f"training on {worker}")

    images, labels = synthetic_digits(2048, seed=0)
    test_images, test_labels = synthetic_digits(512, seed=1)
    # The data goes to the worker once; every batch below is a view that never leaves it.
    x, y = images.send(worker), labels.send(worker)
    batches = [(x[i:i + 128], y[i:i + 128]) for i in range(0, len(images), 128)]
    test = (test_images.send(worker), test_labels.send(worker))

    for name, make in (("MLP", MLP), ("CNN", CNN)):
        torch.manual_seed(0)
        model = tr.send(make(), worker)       # parameters and buffers now live on the worker
        fit(model, batches, test, args.epochs, name)
        tr.get(model)                         # and back: an ordinary local model again
        print(f"{name}: weights fetched, first layer mean {next(model.parameters()).mean():.4f}")

    worker.close()
    if server:
        server.stop()


if __name__ == "__main__":
    main()
