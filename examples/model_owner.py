"""The model owner: computes on Bob's data through pointers, never receiving the data itself.

    python examples/model_owner.py    # with examples/bob.py running
"""
import sys

import torch
import torchremote as tr

url = sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:3000"
bob = tr.connect(url)
x, y = bob.search("#X")[0], bob.search("#Y")[0]
print(y)                        # a pointer: id, worker 'bob', shape, dtype; no data
z = torch.add(x, y)             # runs on bob; z is a RemoteTensor
print(z.get())                  # tensor([2., 3., 4., 5., 6.])
print(bob.objects())            # the registry: ids, owners, tags, shapes
w = torch.tensor([1., 2]).send(bob) * 3
print(w.sum().item())           # 9.0
bob.close()
