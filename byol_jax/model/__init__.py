"""The networks and the loss: pure functions of parameters.

`resnet` (the encoder), `networks` (online and target networks, projector,
predictor, probe, input normalisation) and `objectives` (the BYOL loss and the
probe's cross-entropy). Imports only JAX and Haiku.
"""
