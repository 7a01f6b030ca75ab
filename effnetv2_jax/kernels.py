"""Convolution kernels, and the one place that chooses between XLA's convolutions and the CPU
paths (shifted multiply-adds, im2col matrix products) that XLA:CPU runs several times faster.

Activations are NHWC, kernels HWIO, pads explicit ((top, bottom), (left, right)). Layers call
`conv2d`; a whole model runs another implementation inside `use_implementation`. The per-kernel
timings behind the choices are next to the code; the whole model's: benchmarks/throughput.py,
docs/performance.md.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax

# 'auto': the CPU paths when compiled for CPU, where they pay (every depthwise conv; the forward of
#     dense convs with at most IM2COL_MAX_INPUT_FEATURES inputs; the kernel gradient of dense convs
#     with at least IM2COL_MIN_FEATURES outputs), XLA's convolutions elsewhere (cuDNN on GPU). The
#     choice is made per platform when lowering (`lax.platform_dependent`), so one jax.export
#     artifact for several platforms runs the right one on each.
# 'xla': XLA's convolutions only. 'cpu': the CPU paths only, on any platform.
# Under every choice a 1x1 stride-1 conv is a matrix product over the channel axis.
IMPLEMENTATIONS = ('auto', 'xla', 'cpu')

# Measured per conv of S on a 2-core CPU, batch 8. Forward: im2col is ~4x faster than XLA's for
# the 3->24 stem, whose 3 input channels use the vector units poorly, and 1.5-6x slower from 24
# input channels on. Kernel gradient: im2col is 1.3-3.6x faster than XLA's for the 24->96, 48->192
# and 64->256 convs, but ~1.5x slower for the 24->24: a narrow matrix product does not pay for
# writing the k*k windows.
IM2COL_MAX_INPUT_FEATURES = 4
IM2COL_MIN_FEATURES = 64

_implementation = contextvars.ContextVar('effnetv2_jax_conv_implementation', default='auto')


def _checked(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'convolution implementation must be one of {IMPLEMENTATIONS}, '
                         f'got {implementation!r}')
    return implementation


@contextlib.contextmanager
def use_implementation(implementation: str):
    """Convolutions traced inside the block use `implementation`, one of IMPLEMENTATIONS.

    The choice is read when a function is traced, not when it runs: jit inside the block, with a
    function JAX has not traced yet (a jitted function called before reuses its trace, and so the
    implementation it was traced with):

        with kernels.use_implementation('xla'):
            logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    """
    token = _implementation.set(_checked(implementation))
    try:
        yield
    finally:
        _implementation.reset(token)


def conv2d(x, kernel, *, stride: int, pads, depthwise: bool = False):
    """A conv without bias, by the implementation of the enclosing `use_implementation` ('auto'
    outside one). x (N, H, W, C_in), kernel (k, k, C_in, C_out), or (k, k, 1, C_in) if
    `depthwise`, both of one dtype -> (N, Ho, Wo, C_out) in that dtype."""
    implementation = _implementation.get()
    if depthwise:
        return depthwise_conv(x, kernel, stride, pads, implementation)
    if kernel.shape[:2] == (1, 1) and stride == 1 and pads == ((0, 0), (0, 0)):
        return pointwise_conv(x, kernel)
    return dense_conv(x, kernel, stride, pads, implementation)


def _choose(implementation: str, operands, xla, cpu, cpu_pays: bool = True):
    """`xla(*operands)` or `cpu(*operands)`, as `implementation` says; 'auto' is `cpu` when
    compiled for CPU if `cpu_pays`, else `xla`."""
    if _checked(implementation) == 'cpu':
        return cpu(*operands)
    if implementation == 'auto' and cpu_pays:
        return lax.platform_dependent(*operands, cpu=cpu, default=xla)
    return xla(*operands)


def _xla_conv(x, kernel, stride: int, pads, groups: int = 1):
    return lax.conv_general_dilated(x, kernel, (stride, stride), pads,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    feature_group_count=groups)


def pointwise_conv(x, kernel):
    """A 1x1 stride-1 conv as one matrix product over the channel axis, which XLA:CPU runs faster
    than a 1x1 convolution: x (N, H, W, C_in), kernel (1, 1, C_in, C_out) -> (N, H, W, C_out)."""
    return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


# ------------------------------------------------------------------------------------------------
# Depthwise: XLA's grouped convolution, or shifted multiply-adds on CPU.


def _output_hw(x, kernel_size: int, stride: int, pads):
    return [(x.shape[d] + sum(pads[d - 1]) - kernel_size) // stride + 1 for d in (1, 2)]


def _windows(x, kernel_size: int, stride: int, pads, out_hw):
    """The k*k strided windows of the zero-padded input, in float32: one (N, Ho, Wo, C) per tap."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0))).astype(jnp.float32)
    n, c, (ho, wo), s = xp.shape[0], xp.shape[3], out_hw, stride
    return [lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                      (1, s, s, 1)) for i in range(kernel_size) for j in range(kernel_size)]


def _shifted_depthwise(x, kernel, stride: int, pads):
    k = kernel.shape[0]
    w = kernel.reshape(k * k, -1).astype(jnp.float32)
    windows = _windows(x, k, stride, pads, _output_hw(x, k, stride, pads))
    return sum(t * w[i] for i, t in enumerate(windows)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_depthwise_conv(x, kernel, stride: int, pads):
    """Depthwise conv as k*k shifted multiply-adds, which XLA:CPU fuses into one loop, where its
    grouped convolution is slow: over the 30 depthwise convs of S at 224 px, batch 8, 2 cores,
    21 ms forward and 52 ms forward + backward vs 603 ms and 4,644 ms (S's forward: 7.1 -> 20.1
    img/s in benchmarks/throughput.py). x (N, H, W, C), kernel (k, k, 1, C) -> (N, Ho, Wo, C)."""
    return _shifted_depthwise(x, kernel, stride, pads)


def _shifted_depthwise_fwd(x, kernel, stride, pads):
    return _shifted_depthwise(x, kernel, stride, pads), (x, kernel)


def _shifted_depthwise_bwd(stride, pads, residuals, g):
    x, kernel = residuals
    k, n = kernel.shape[0], x.shape[0]
    dx, = jax.vjp(lambda x: _shifted_depthwise(x, kernel, stride, pads), x)[1](g)  # fused pads
    # Autodiff's kernel gradient is k*k reductions of materialised (N, Ho, Wo, C) products, ~15x
    # slower on CPU. Instead: sum groups of r <= 8 images with explicit adds and write every tap
    # into one (N/r, Ho, Wo, k*k, C) array (one loop fusion: LLVM unswitches the iota selects),
    # then one reduction. More than ~8 terms per group, or a scan, defeats the fusion.
    r, g32 = max(d for d in range(1, 9) if n % d == 0), g.astype(jnp.float32)
    tap_index, per_tap = lax.broadcasted_iota(jnp.int32, (1, 1, 1, k * k, 1), 3), 0
    for t, window in enumerate(_windows(x, k, stride, pads, g.shape[1:3])):
        products = (window * g32).reshape(r, n // r, *g.shape[1:])
        per_tap = jnp.where(tap_index == t, sum(products[m] for m in range(r))[:, :, :, None],
                            per_tap)
    return dx, per_tap.sum((0, 1, 2)).reshape(kernel.shape).astype(kernel.dtype)


shifted_depthwise_conv.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def depthwise_conv(x, kernel, stride: int, pads, implementation: str = 'auto'):
    """x (N, H, W, C), kernel (k, k, 1, C) -> (N, Ho, Wo, C): XLA's grouped convolution or, on
    CPU, `shifted_depthwise_conv`, as `implementation` (see IMPLEMENTATIONS) says."""
    def grouped(x, kernel):
        return _xla_conv(x, kernel, stride, pads, groups=x.shape[-1])

    def shifted(x, kernel):
        return shifted_depthwise_conv(x, kernel, stride, pads)

    return _choose(implementation, (x, kernel), grouped, shifted)


# ------------------------------------------------------------------------------------------------
# Dense: XLA's convolution, or im2col matrix products on CPU where they pay.


def _im2col_patches(x, kernel_size: int, stride: int, pads, out_hw):
    """The k*k strided windows of the padded input side by side: (N, Ho, Wo, k*k, C) float32."""
    return jnp.stack(_windows(x, kernel_size, stride, pads, out_hw), axis=3)


def conv_forward(x, kernel, stride: int, pads, implementation: str = 'auto'):
    """A dense conv: x (N, H, W, C_in), kernel (k, k, C_in, C_out) -> (N, Ho, Wo, C_out).

    XLA's convolution, or on CPU one matrix product of the k*k strided windows (N*Ho*Wo, k*k*C_in)
    with the kernel (k*k*C_in, C_out); 'auto' picks the latter for
    C_in <= IM2COL_MAX_INPUT_FEATURES.
    """
    def im2col(x, kernel):
        k, c_in, c_out = kernel.shape[0], x.shape[-1], kernel.shape[-1]
        patches = _im2col_patches(x, k, stride, pads, _output_hw(x, k, stride, pads))
        patches = patches.astype(x.dtype)
        return lax.dot_general(patches, kernel.reshape(k * k, c_in, c_out),
                               (((3, 4), (0, 1)), ((), ())))

    def xla(x, kernel):
        return _xla_conv(x, kernel, stride, pads)

    return _choose(implementation, (x, kernel), xla, im2col,
                   cpu_pays=x.shape[-1] <= IM2COL_MAX_INPUT_FEATURES)


def conv_kernel_gradient(x, g, kernel_size: int, stride: int, pads, implementation: str = 'auto'):
    """The kernel gradient of a dense conv: input x (N, H, W, C_in) and output cotangent
    g (N, Ho, Wo, C_out) -> float32 (k, k, C_in, C_out).

    XLA's transposed convolution, or on CPU one matrix product of the k*k strided windows
    (N*Ho*Wo, k*k*C_in) with g (N*Ho*Wo, C_out); 'auto' picks the latter for
    C_out >= IM2COL_MIN_FEATURES.
    """
    k, c_in, c_out = kernel_size, x.shape[-1], g.shape[-1]

    def xla(x, g):
        kernel = jax.ShapeDtypeStruct((k, k, c_in, c_out), x.dtype)
        dw, = jax.linear_transpose(lambda w: _xla_conv(x, w, stride, pads), kernel)(g)
        return dw.astype(jnp.float32)

    def im2col(x, g):
        patches = _im2col_patches(x, k, stride, pads, g.shape[1:3])
        dw = lax.dot_general(patches.reshape(-1, k * k * c_in),
                             g.reshape(-1, c_out).astype(jnp.float32), (((0,), (0,)), ((), ())))
        return dw.reshape(k, k, c_in, c_out)

    return _choose(implementation, (x, g), xla, im2col, cpu_pays=c_out >= IM2COL_MIN_FEATURES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense_conv(x, kernel, stride: int, pads, implementation: str = 'auto'):
    """`conv_forward` with the kernel gradient of `conv_kernel_gradient` (XLA:CPU's own is 3-7x
    slower than the forward for the wide convs of the fused blocks) and XLA's input gradient.
    x (N, H, W, C_in), kernel (k, k, C_in, C_out) -> (N, Ho, Wo, C_out)."""
    return conv_forward(x, kernel, stride, pads, implementation)


def _dense_conv_fwd(x, kernel, stride, pads, implementation):
    return conv_forward(x, kernel, stride, pads, implementation), (x, kernel)


def _dense_conv_bwd(stride, pads, implementation, residuals, g):
    x, kernel = residuals
    dx, = jax.vjp(lambda x: _xla_conv(x, kernel, stride, pads), x)[1](g)
    dw = conv_kernel_gradient(x, g, kernel.shape[0], stride, pads, implementation)
    return dx, dw.astype(kernel.dtype)


dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)
