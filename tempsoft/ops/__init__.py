"""The ops, one file each: checks, custom-op registration, autograd, backend dispatch."""
