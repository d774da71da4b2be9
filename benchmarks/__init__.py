"""Benchmarks: torchremote side by side with local PyTorch, torch.distributed.rpc, raw websockets and TCP."""
