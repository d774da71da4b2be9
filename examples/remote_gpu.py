"""A laptop drives a bigger box: the model is built, trained and evaluated there.

On the box:     torchremote worker --id box --host 0.0.0.0 --port 3000 --token-file token --device cuda
On the laptop:  TORCHREMOTE_TOKEN=... python examples/remote_gpu.py ws://BOX:3000

With no URL, this starts a worker in this process (on the GPU if there is one here). With
--compiled, the forward is compiled on the box and the optimizer steps there as one op
(tr.compile): a step costs the laptop a handful of calls instead of one per torch op.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchremote as tr

parser = argparse.ArgumentParser(description="train a model on a remote box")
parser.add_argument("url", nargs="?", help="the box's worker (default: one in this process)")
parser.add_argument("--compiled", action="store_true", help="tr.compile the model and the optimizer")
args = parser.parse_args()
url = args.url
server = None
if url is None:
    server = tr.start_worker(id="box", device="cuda" if torch.cuda.is_available() else "cpu")
    url = server.url
box = tr.connect(url, retry_for=10)
print(f"driving {box}")

box.manual_seed(0)
with tr.on(box):                    # weights are created on the box: they never exist here
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10))
    data = torch.randn(4096, 512)   # generated on the box too
    target = data[:, :10].argmax(1)  # a rule to learn: which of the first 10 features is largest
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
if args.compiled:
    model, opt = tr.compile(model), tr.compile(opt)  # captured at the first step, compiled on the box

start = time.perf_counter()
for step in range(1, 21):
    batch = slice((step % 16) * 256, (step % 16 + 1) * 256)
    opt.zero_grad()
    loss = F.cross_entropy(model(data[batch]), target[batch])
    loss.backward()
    opt.step()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")  # the only data that comes back
print(f"20 steps in {time.perf_counter() - start:.2f} s; the {sum(p.numel() for p in model.parameters())} "
      f"parameters live on the box, this process holds only pointers")

box.close()
if server:
    server.stop()
