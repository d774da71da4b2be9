"""Both halves of the walkthrough in one process, with the worker on a background thread."""
import torch
import torchremote as tr

# Bob, the data owner
server = tr.start_worker(id="bob", host="127.0.0.1", port=0)   # port 0: any free port
server.publish(torch.tensor([1., 2, 3, 4, 5]), tags=["#X"], description="Bob's X")
server.publish(torch.tensor([1., 1, 1, 1, 1]), tags=["#Y"], description="Bob's Y")
print(f"worker 'bob' serving on {server.url}")

# The model owner
bob = tr.connect(server.url)
x, y = bob.search("#X")[0], bob.search("#Y")[0]
print("pointer:", y)
z = torch.add(x, y)
print("z = x + y on bob:", z)
print("z.get():", z.get())
print("bob's registry, as this client sees it:")
print(bob.objects())
w = torch.tensor([1., 2]).send(bob) * 3
print("(w * 3).sum().item():", w.sum().item())

# Ordinary torch code runs unchanged on pointers
a = torch.randn(4, 3).send(bob)
h = torch.nn.functional.relu(a @ torch.randn(3, 2)).softmax(dim=-1)
print("softmax(relu(a @ W)) on bob:", h.get())

bob.close()
server.stop()
