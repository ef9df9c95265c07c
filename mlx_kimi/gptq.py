"""GPTQ on MLX's affine quantization, for one weight at a time with its own Hessian.

The algorithm is mlx-lm's (mlx_lm/quant/gptq.py): per group of columns, the scales and biases
come from `mx.quantize` of the columns as the corrections so far have left them; each column's
rounding error is then spread over the columns not yet quantized through the Cholesky factor
of the inverse Hessian H = X^T X (X: the inputs that reached the module). mlx-lm's version
catches every module's inputs in one pass over the whole model and packs 2, 4 or 8 bits; here
H comes from the streamed calibration (mlx_kimi/calibrate.py), rows are done a block at a time,
columns are evaluated once per group instead of once per column, and every MLX bit width packs.
"""

import mlx.core as mx
import numpy as np

DAMP = 0.1  # of the mean diagonal, added to H (mlx-lm: 0.01; 0.1 generalizes better past a small calibration set)


def inverse_hessian_factor(h: mx.array) -> mx.array:
    """Upper Cholesky factor of (H + damping)^-1; columns no input ever reached get H_ii = 1
    (their weights multiply zeros: any rounding of them is free)."""
    with mx.stream(mx.cpu):
        h = h.astype(mx.float32)
        diag = mx.diag(h)
        dead = diag <= 0
        h = h + mx.diag(mx.where(dead, 1.0, 0.0) + DAMP * mx.mean(mx.where(dead, 1.0, diag)))
        inverse = mx.linalg.cholesky_inv(mx.linalg.cholesky(h))
        factor = mx.linalg.cholesky(inverse, upper=True)
        mx.eval(factor)
        return factor


class ModuleInputs:
    """The inputs X (tokens, in_features) that reached a module, or their Hessian X^T X already
    summed, and GPTQ's inverse_hessian_factor of them, computed on first use and then kept: modules
    that read the same inputs share one (an MLP's gate and up; the lm_head's row blocks). For Kimi's
    experts that halves the work: gate's and up's factors are 7168 x 7168, down's 2048 x 2048."""

    def __init__(self, x: mx.array | None = None, hessian: mx.array | None = None, tokens: int = 0):
        self.x, self.hessian = x, hessian
        self.tokens = x.shape[0] if x is not None else tokens
        self._factor = None

    def factor(self) -> mx.array:
        if self._factor is None:
            self._factor = inverse_hessian_factor(self.hessian if self.hessian is not None else self.x.T @ self.x)
        return self._factor


def pack(codes: mx.array, bits: int) -> mx.array:
    """Integer codes (rows, cols) in [0, 2^bits) -> MLX's packed uint32 (rows, cols * bits / 32):
    a little-endian bit stream, code i at bits [i * bits, (i + 1) * bits) (mx.quantize's layout)."""
    rows, cols = codes.shape
    c = np.array(codes, dtype=np.uint64)
    stream = np.zeros((rows, cols * bits), dtype=np.uint8)
    for b in range(bits):
        stream[:, b::bits] = (c >> np.uint64(b)) & np.uint64(1)
    packed = np.packbits(stream, axis=-1, bitorder="little")
    return mx.array(packed.view(np.uint32).reshape(rows, cols * bits // 32))


def gptq_quantize(w: mx.array, factor: mx.array, bits: int, group_size: int) -> tuple:
    """(packed, scales, biases) of w (rows, cols) with GPTQ's error correction; `factor` is
    inverse_hessian_factor of the module's H (cols, cols). Scales and biases are float32."""
    w = w.astype(mx.float32)
    top = 2**bits - 1
    cols = w.shape[-1]
    all_codes, all_scales, all_biases = [], [], []
    for i in range(0, cols, group_size):
        j = i + group_size
        _, scales, biases = mx.quantize(w[:, i:j], group_size=group_size, bits=bits)
        block = w[:, i:j]
        errors, codes = [], []
        for k in range(group_size):
            col = block[:, k:k + 1]
            q = mx.clip(mx.round((col - biases) / scales), 0, top)
            e = (col - (scales * q + biases)) / factor[i + k, i + k]
            block = mx.concatenate([block[:, :k + 1], block[:, k + 1:] - e @ factor[i + k: i + k + 1, i + k + 1: j]],
                                   axis=1)
            codes.append(q)
            errors.append(e)
        err = mx.concatenate(errors, axis=1)
        if j < cols:
            w = mx.concatenate([w[:, :j], w[:, j:] - err @ factor[i:j, j:]], axis=1)
        q = mx.concatenate(codes, axis=1).astype(mx.uint32)
        mx.eval(q, scales, biases, w)
        all_codes.append(q)
        all_scales.append(scales)
        all_biases.append(biases)
    return pack(mx.concatenate(all_codes, axis=1), bits), mx.concatenate(all_scales, 1), mx.concatenate(all_biases, 1)


def rtn_quantize(w: mx.array, bits: int, group_size: int) -> tuple:
    """Plain round-to-nearest (mx.quantize), for modules without enough calibration inputs."""
    return tuple(mx.quantize(w, group_size=group_size, bits=bits))


def output_error(x: mx.array, w: mx.array, quantized: tuple, bits: int, group_size: int) -> float:
    """||X W^T - X Wq^T||^2: the squared error the quantized weight adds to the module's output on X."""
    wq = mx.dequantize(*quantized, group_size=group_size, bits=bits)
    d = x @ (w.astype(mx.float32) - wq.astype(mx.float32)).T
    return float((d * d).sum())


def sum_squares(a: mx.array) -> float:
    return float(squares(a))


def squares(a: mx.array) -> mx.array:
    """The sum of squares, unevaluated (candidates' errors are evaluated together)."""
    return (a.astype(mx.float32) ** 2).sum()


def rtn_dequantized(w: mx.array, candidate) -> mx.array:
    """w quantized to `candidate` by round to nearest, dequantized (float32)."""
    if candidate is None:
        return w
    bits, group = candidate
    flat = w.reshape(-1, w.shape[-1])
    q = mx.dequantize(*mx.quantize(flat, group_size=group, bits=bits), group_size=group, bits=bits)
    return q.reshape(w.shape).astype(mx.float32)
