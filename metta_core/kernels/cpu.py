"""Compiled CPU advantage kernel (numba), bit-identical to the sequential float32 loop.

Layout: rows are processed four at a time in two passes. Pass 1 reads each row forward
(prefetch-friendly, vectorizable) into a small scratch of TD errors ``delta`` and trace coefficients ``coef``;
pass 2 runs the four independent recursions ``A[t] = delta[t] + coef[t] * A[t+1]``
interleaved, so their latency overlaps instead of one chain stalling the core, and writes the
four output rows directly. Both passes also check the values (finite inputs, 0/1 flags, ratio >=
0, finite result) while the elements are in registers: about a fifth of the kernel's time at
``[16384, 64]``, against three times the kernel for a separate torch reduction. The entry points
return a nonzero count when something fails, and the caller then diagnoses it. Every row's
arithmetic is the same whatever the thread count, so the serial and the parallel entry points
give the same bits.

Thread policy (``kernel_threads``): the kernel runs on ``min(budget, numba's pool, blocks)``
threads, where ``budget`` is the caller's (``torch.get_num_threads()`` in
``metta_core.advantage``, which follows ``OMP_NUM_THREADS``), and on one thread below
``PARALLEL_MIN_ELEMENTS`` elements, where starting a thread team costs more than it saves. One
thread runs ``advantage_serial``, which never touches numba's threading layer; more run
``advantage_parallel`` under a numba thread mask (``numba.set_num_threads``) that is restored
after the call.
"""

from __future__ import annotations

import numba
import numpy as np

_ROWS_PER_BLOCK = 4


@numba.njit(cache=True, boundscheck=False)
def _bad(v, r, d, w):
    """True unless ``v``, ``r`` are finite, ``d`` is 0 or 1 and ``w`` is finite and >= 0.

    ``x - x != 0`` is true exactly for inf and NaN; ``!=`` is true for NaN, ``<`` false.
    """
    zero = np.float32(0.0)
    return (v - v != zero) | (r - r != zero) | ((d != zero) & (d != np.float32(1.0))) | (w < zero) | (w - w != zero)


@numba.njit(cache=True, boundscheck=False)
def _row_terms(values, rewards, dones, ratio, s, gamma, gl, rho_clip, c_clip, delta, coef, i):
    """Pass 1 for row ``s`` into scratch row ``i``: ``delta[i, t]`` and
    ``coef[i, t] = gamma*lambda*min(w,c_clip)*nnt`` for t < H-1; returns whether an input of the
    row fails ``_bad`` (a bool, not a count: a bool OR keeps the loop 8 floats wide).

    Takes the 2-D arrays and row indices, not row views: a view per row costs a reference-count
    increment and decrement each (atomic), which on the serial path made the kernel 1.6x slower at
    ``[16384, 64]`` than the same code inlined into the parallel entry point.
    """
    one = np.float32(1.0)
    h = values.shape[1]
    bad = _bad(values[s, 0], rewards[s, 0], dones[s, 0], ratio[s, h - 1])
    for t in range(h - 1):
        v1 = values[s, t + 1]
        r1 = rewards[s, t + 1]
        d1 = dones[s, t + 1]
        wt = ratio[s, t]
        nnt = one - d1
        delta[i, t] = min(wt, rho_clip) * (r1 + gamma * v1 * nnt - values[s, t])
        coef[i, t] = gl * min(wt, c_clip) * nnt
        bad |= _bad(v1, r1, d1, wt)
    return bad


@numba.njit(cache=True, boundscheck=False)
def _block(values, rewards, dones, ratio, s0, n_rows, gamma, gl, rho_clip, c_clip, delta, coef, out):
    """Rows ``s0 .. s0+n_rows-1`` into ``out``; returns 0 when their inputs are valid (see ``_bad``)
    and their advantages finite, a positive count otherwise.

    A non-finite ``A[t]`` makes every earlier ``A`` non-finite (``coef`` is finite for valid
    inputs and ``coef * inf`` is inf or NaN), so checking ``A[0]`` checks the row.
    """
    bad = 0
    for i in range(n_rows):
        bad += _row_terms(values, rewards, dones, ratio, s0 + i, gamma, gl, rho_clip, c_clip, delta, coef, i)
    h = values.shape[1]
    zero = np.float32(0.0)
    for i in range(n_rows):
        out[s0 + i, h - 1] = zero
    if n_rows == _ROWS_PER_BLOCK:  # pass 2: four interleaved recursions
        a0 = a1 = a2 = a3 = zero
        for t in range(h - 2, -1, -1):
            a0 = delta[0, t] + coef[0, t] * a0
            a1 = delta[1, t] + coef[1, t] * a1
            a2 = delta[2, t] + coef[2, t] * a2
            a3 = delta[3, t] + coef[3, t] * a3
            out[s0, t] = a0
            out[s0 + 1, t] = a1
            out[s0 + 2, t] = a2
            out[s0 + 3, t] = a3
        bad += (a0 - a0 != zero) | (a1 - a1 != zero) | (a2 - a2 != zero) | (a3 - a3 != zero)
    else:
        for i in range(n_rows):
            a = zero
            for t in range(h - 2, -1, -1):
                a = delta[i, t] + coef[i, t] * a
                out[s0 + i, t] = a
            bad += a - a != zero
    return bad


PARALLEL_MIN_ELEMENTS = 1 << 16
"""Below this many elements (``segments * horizon``) the kernel runs on one thread.

``python -m benchmarks.advantage --crossover`` on the 2-core machine (shared, load average
~10): with the second core free a 2-thread call takes 0.4-0.8x the serial time from 2k elements
on, but the gain below 64k elements is at most tens of microseconds, while a call whose second
thread waits for a busy core can take several times the serial time. 64k keeps the training
phase's per-minibatch calls (512 elements with the CLI defaults) and small buffers off the pool.
"""


def kernel_threads(segments: int, horizon: int, budget: int, pool: int) -> int:
    """Threads for one call: ``min(budget, pool, row blocks)``, and 1 below ``PARALLEL_MIN_ELEMENTS``.

    ``budget`` is the caller's thread budget, ``pool`` the size of numba's thread pool
    (``numba.config.NUMBA_NUM_THREADS``).
    """
    if segments * horizon < PARALLEL_MIN_ELEMENTS:
        return 1
    n_blocks = (segments + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    return max(1, min(budget, pool, n_blocks))


@numba.njit(cache=True, boundscheck=False)
def advantage_serial(values, rewards, dones, ratio, gamma, gae_lambda, rho_clip, c_clip, out):
    """SPEC §2 into ``out`` on the calling thread; arrays ``[segments, horizon]`` C-contiguous
    float32, scalars float32. Returns 0 when every input is valid (``_bad``) and every advantage
    finite, a positive number otherwise (then diagnose with the caller's own checks)."""
    segments, horizon = values.shape
    gl = gamma * gae_lambda
    delta = np.empty((_ROWS_PER_BLOCK, horizon), np.float32)
    coef = np.empty((_ROWS_PER_BLOCK, horizon), np.float32)
    bad = 0
    for s0 in range(0, segments, _ROWS_PER_BLOCK):
        n_rows = min(_ROWS_PER_BLOCK, segments - s0)
        bad += _block(values, rewards, dones, ratio, s0, n_rows, gamma, gl, rho_clip, c_clip, delta, coef, out)
    return bad


@numba.njit(cache=True, parallel=True, boundscheck=False)
def advantage_parallel(values, rewards, dones, ratio, gamma, gae_lambda, rho_clip, c_clip, out, n_threads):
    """``advantage_serial`` with the row blocks split into ``n_threads`` chunks run by numba's
    threads; call it with ``numba.set_num_threads(n_threads)`` in effect (``n_threads`` is passed
    in so the compiled code can be cached); returns what ``advantage_serial`` returns."""
    segments, horizon = values.shape
    gl = gamma * gae_lambda
    n_blocks = (segments + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK
    n_chunks = max(1, min(n_threads, n_blocks))
    bad = 0
    for c in numba.prange(n_chunks):
        delta = np.empty((_ROWS_PER_BLOCK, horizon), np.float32)
        coef = np.empty((_ROWS_PER_BLOCK, horizon), np.float32)
        for b in range(c * n_blocks // n_chunks, (c + 1) * n_blocks // n_chunks):
            s0 = b * _ROWS_PER_BLOCK
            n_rows = min(_ROWS_PER_BLOCK, segments - s0)
            bad += _block(values, rewards, dones, ratio, s0, n_rows, gamma, gl, rho_clip, c_clip, delta, coef, out)
    return bad
