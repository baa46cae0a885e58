/* Compiled into the ahead-of-time kernel module (kernels/build.py): the C functions its code calls by name
   that no loaded library exports. Each forwards to an address Python sets once (kernels/backend.py):
   numba_parallel_for and get_num_threads to Numba's threading layer (the functions a parallel loop
   calls), npmobile_sgemm to the sgemm of the OpenBLAS NumPy loaded (kernels/blas.py). */
#include <stddef.h>
#include <stdint.h>

typedef void (*parallel_for_t)(void *, char **, size_t *, size_t *, void *, size_t, size_t, int);
typedef int (*get_num_threads_t)(void);
typedef void (*sgemm_t)(int32_t, int32_t, int32_t, int64_t, int64_t, int64_t, float, int64_t, int64_t,
                        int64_t, int64_t, float, int64_t, int64_t);

static parallel_for_t p_parallel_for;
static get_num_threads_t p_get_num_threads;
static sgemm_t p_sgemm;

void npm_set_threading(void *parallel_for, void *get_num_threads)
{
    p_parallel_for = (parallel_for_t)parallel_for;
    p_get_num_threads = (get_num_threads_t)get_num_threads;
}

void npm_set_sgemm(void *sgemm)
{
    p_sgemm = (sgemm_t)sgemm;
}

void numba_parallel_for(void *fn, char **args, size_t *dims, size_t *steps, void *data, size_t inner_ndim,
                        size_t array_count, int num_threads)
{
    p_parallel_for(fn, args, dims, steps, data, inner_ndim, array_count, num_threads);
}

int get_num_threads(void)
{
    return p_get_num_threads();
}

void npmobile_sgemm(int32_t order, int32_t trans_a, int32_t trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    int64_t a, int64_t lda, int64_t b, int64_t ldb, float beta, int64_t c, int64_t ldc)
{
    p_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
