"""One module per stage of Algorithm 1; each declares its config slice, its inputs and `run`."""
