"""Bob, the data owner: publishes two tagged tensors and serves them. Run before model_owner.py.

    python examples/bob.py            # serves on ws://127.0.0.1:3000 until Ctrl-C
"""
import sys

import torch
import torchremote as tr

port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
server = tr.start_worker(id="bob", host="127.0.0.1", port=port, verbose=True)
server.publish(torch.tensor([1., 2, 3, 4, 5]), tags=["#X"], description="Bob's X")
server.publish(torch.tensor([1., 1, 1, 1, 1]), tags=["#Y"], description="Bob's Y")
print(server.url, flush=True)
print(server.objects(), flush=True)
server.serve_forever()          # or: torchremote worker --id bob --port 3000
