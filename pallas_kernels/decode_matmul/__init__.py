"""Weight-streaming matmul for decode-sized steps (x [M, K] @ w [N, K].T, M = the step's token
rows): `reference.decode_matmul` (jnp, any backend) and `gpu.decode_matmul` (Pallas Mosaic GPU,
TMA + wgmma, Hopper)."""

from .reference import decode_matmul as reference_decode_matmul

__all__ = ["reference_decode_matmul"]
