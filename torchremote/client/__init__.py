"""The user's process: the session with a worker, `RemoteTensor` pointers, autograd bookkeeping,
dispatch of torch calls, modules and optimizers, and the `remote` device. Imports only `wire`.

Layers, each importing only those below it: connection -> session -> pointer (`tensor.py`) ->
autograd bookkeeping -> dispatch -> the calls answered specially, the device's kernels, the
`Worker` handle, modules, optimizers, code that travels. Importing the package registers the
`remote` device and the handlers dispatch consults.
"""
from . import device  # noqa: F401  (the `remote` device first: pointers are made on it)
from . import dispatch  # noqa: F401  (installs the dispatcher every RemoteTensor call goes to)
from . import autograd_calls, backend, checkpoints, compiled, optim, special  # noqa: F401  (handlers, kernels, hooks)
