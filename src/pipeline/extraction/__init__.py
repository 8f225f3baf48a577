"""The model side of extraction: building models, forward hooks and pooling, devices and the
loader plan, the forward pass, and the engines (local, Ray) whose batches feed the one loop
that stages chunks (`loop.py`)."""
