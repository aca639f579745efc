"""Back ends of the advantage kernel: a compiled CPU kernel (numba) and a vectorized torch scan."""
