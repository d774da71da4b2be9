"""The worker's process: the server and its connections, running each client's commands, the object
store, provenance of private data and its releases, data published from files. Imports only `wire`."""
