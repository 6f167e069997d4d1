/* The arithmetic of a merge into a base, one pass per block of rows:

       lowrank_add_cast:  out = round_to_nearest_even(float32(src) + left @ right)
       add_cast:          out = round_to_nearest_even(float32(src) + delta)

   src is bfloat16, float16 or float32 bits; delta is float32 (or absent: a plain
   conversion); out is bfloat16, float16 or float32. Inputs are any buffer (an
   mmap'ed shard, a numpy array); the GIL is released while the loops run.

   Rounding rules, identical to adapterhub_local.merge.cast's numpy fallback:
   - float32 -> bfloat16: round to nearest, ties to even; NaN -> 0x7fc0; finite
     values past the largest bfloat16 become inf;
   - float32 -> float16: round to nearest, ties to even, subnormals included;
     NaN -> sign | 0x7e00 | top payload bits (a quiet NaN); overflow -> inf.
   Returns how many outputs are not finite (the float16 overflow check needs it).

       dora_rows_cast:    out = round_to_nearest_even(t * (m / ‖t‖ per row))   (DoRA, merge/dora.py)

   Built with plain -O3 for the baseline ISA; on x86-64 an AVX2 + FMA + F16C path
   (intrinsics) is chosen at run time when the CPU has them, with the same bits. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

enum { K_BF16 = 0, K_F16 = 1, K_F32 = 2 };

static int kind_of(const char *name) {
    if (strcmp(name, "BF16") == 0) return K_BF16;
    if (strcmp(name, "F16") == 0) return K_F16;
    if (strcmp(name, "F32") == 0) return K_F32;
    return -1;
}

static const Py_ssize_t ITEM[3] = {2, 2, 4};

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline uint16_t f32_to_bf16(uint32_t x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static inline uint16_t f32_to_f16(uint32_t x) {
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {  /* a normal float16: rebias the exponent, round the 13 dropped bits */
        uint32_t r = a - 0x38000000u;
        return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    uint32_t e = a >> 23;  /* a float16 subnormal (or zero): m * 2^-24 */
    if (e < 102) return (uint16_t)sign;  /* below 2^-25: rounds to zero */
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  /* 14..24 */
    uint32_t m = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (m & 1u))) m += 1;
    return (uint16_t)(sign | m);
}

static inline uint32_t f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return sign | 0x7f800000u | (m << 13);
    if (e == 0) return m ? sign | f32_bits((float)m * 5.9604644775390625e-8f) : sign;
    return sign | ((e + 112u) << 23) | (m << 13);
}

#define LOAD_LOOP(BODY)                                                            \
    switch (sk) {                                                                  \
    case K_BF16:                                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                       \
            uint16_t s; memcpy(&s, sp + 2 * i, 2);                                 \
            float v = bits_f32((uint32_t)s << 16);                                 \
            BODY                                                                   \
        }                                                                          \
        break;                                                                     \
    case K_F16:                                                                    \
        for (Py_ssize_t i = 0; i < n; i++) {                                       \
            uint16_t s; memcpy(&s, sp + 2 * i, 2);                                 \
            float v = bits_f32(f16_to_f32(s));                                     \
            BODY                                                                   \
        }                                                                          \
        break;                                                                     \
    default:                                                                       \
        for (Py_ssize_t i = 0; i < n; i++) {                                       \
            float v; memcpy(&v, sp + 4 * i, 4);                                    \
            BODY                                                                   \
        }                                                                          \
    }

/* One loop per (src, out) pair so the compiler sees straight-line code. On x86-64 GCC
   also builds an AVX2 copy of it, picked at load time when the CPU has AVX2 (8 lanes
   instead of SSE2's 4); "avx2" does not imply FMA, so v + d is still a plain add. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static uint32_t run(int sk, const char *sp, const float *dp, int ok, char *op, Py_ssize_t n) {
    uint32_t bad = 0;  /* 32 bits keep the vector lanes narrow; callers pass < 2^31 elements */
    if (ok == K_BF16) {
        if (dp) {
            LOAD_LOOP({ float d; memcpy(&d, dp + i, 4);
                        uint16_t r = f32_to_bf16(f32_bits(v + d));
                        bad += (r & 0x7f80u) == 0x7f80u; memcpy(op + 2 * i, &r, 2); })
        } else {
            LOAD_LOOP({ uint16_t r = f32_to_bf16(f32_bits(v));
                        bad += (r & 0x7f80u) == 0x7f80u; memcpy(op + 2 * i, &r, 2); })
        }
    } else if (ok == K_F16) {
        if (dp) {
            LOAD_LOOP({ float d; memcpy(&d, dp + i, 4);
                        uint16_t r = f32_to_f16(f32_bits(v + d));
                        bad += (r & 0x7c00u) == 0x7c00u; memcpy(op + 2 * i, &r, 2); })
        } else {
            LOAD_LOOP({ uint16_t r = f32_to_f16(f32_bits(v));
                        bad += (r & 0x7c00u) == 0x7c00u; memcpy(op + 2 * i, &r, 2); })
        }
    } else {
        if (dp) {
            LOAD_LOOP({ float d; memcpy(&d, dp + i, 4); float r = v + d;
                        bad += (f32_bits(r) & 0x7f800000u) == 0x7f800000u; memcpy(op + 4 * i, &r, 4); })
        } else {
            LOAD_LOOP({ bad += (f32_bits(v) & 0x7f800000u) == 0x7f800000u; memcpy(op + 4 * i, &v, 4); })
        }
    }
    return bad;
}

/* out[i, :] = cast(float32(src[i, :]) + Σ_k left[i, k] · right[k, :]) for a block of rows.

   The low-rank product of a merge, fused with the add and the cast. Every delta value is
   a chain of fused multiply-adds in rank order, acc = fma(left[i,k], right[k,j], acc) from
   acc = 0, so its bits do not depend on block sizes, threads or the CPU (an fma is
   correctly rounded everywhere; without the FMA instruction it is the slow fmaf).
   ``right`` comes packed by the caller in tiles of 16 columns, [tile][k][16], zero-padded
   at the end, so one tile's factors are contiguous and stay in L1 across rows. */
#define TILE 16

/* cast(src[idx] + acc) for one element, any dtype pair */
static inline uint32_t put1(int sk, const char *sp, int ok, char *op, Py_ssize_t idx, float acc) {
    float v;
    if (sk == K_BF16) { uint16_t h; memcpy(&h, sp + 2 * idx, 2); v = bits_f32((uint32_t)h << 16); }
    else if (sk == K_F16) { uint16_t h; memcpy(&h, sp + 2 * idx, 2); v = bits_f32(f16_to_f32(h)); }
    else memcpy(&v, sp + 4 * idx, 4);
    v += acc;
    if (ok == K_BF16) {
        uint16_t r = f32_to_bf16(f32_bits(v)); memcpy(op + 2 * idx, &r, 2); return (r & 0x7f80u) == 0x7f80u;
    }
    if (ok == K_F16) {
        uint16_t r = f32_to_f16(f32_bits(v)); memcpy(op + 2 * idx, &r, 2); return (r & 0x7c00u) == 0x7c00u;
    }
    memcpy(op + 4 * idx, &v, 4);
    return (f32_bits(v) & 0x7f800000u) == 0x7f800000u;
}

static uint32_t lowrank_plain(int sk, const char *sp, const float *left, const float *packed, int ok,
                              char *op, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t rank) {
    uint32_t bad = 0;
    Py_ssize_t tiles = (cols + TILE - 1) / TILE;
    for (Py_ssize_t i = 0; i < rows; i++) {
        const float *l = left + i * rank;
        for (Py_ssize_t t = 0; t < tiles; t++) {
            float acc[TILE] = {0};
            const float *r = packed + t * rank * TILE;
            for (Py_ssize_t k = 0; k < rank; k++)
                for (int jj = 0; jj < TILE; jj++) acc[jj] = fmaf(l[k], r[k * TILE + jj], acc[jj]);
            Py_ssize_t j0 = t * TILE, width = cols - j0 < TILE ? cols - j0 : TILE;
            for (Py_ssize_t jj = 0; jj < width; jj++) bad += put1(sk, sp, ok, op, i * cols + j0 + jj, acc[jj]);
        }
    }
    return bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_FMA_PATH 1
#include <immintrin.h>
/* AVX2 + FMA (+ F16C), chosen at run time when the CPU has them: several rows at a time, the
   accumulators in registers while k runs (_mm256_fmadd_ps rounds exactly as fmaf does), then a vector
   epilogue for bfloat16 -> bfloat16, the common case; other dtypes go element by element. */
__attribute__((target("avx2,fma,f16c")))
static inline uint32_t bf16_round8(__m256 v, __m256i *r_out) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    __m256i inf = _mm256_cmpeq_epi32(_mm256_and_si256(r, _mm256_set1_epi32(0x7f80)), _mm256_set1_epi32(0x7f80));
    *r_out = r;
    return (uint32_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(inf)));
}

__attribute__((target("avx2,fma,f16c")))
static inline __m256 bf16_load8(const char *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 values of any source dtype as float32 (F16C converts float16 exactly) */
__attribute__((target("avx2,fma,f16c")))
static inline __m256 load8(int sk, const char *p) {
    if (sk == K_BF16) return bf16_load8(p);
    if (sk == K_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_ps((const float *)p);
}

/* round 8 float32 values to the output dtype, store them, count the non-finite ones.
   vcvtps2ph rounds to nearest even with subnormals, overflows to inf and keeps a NaN's
   sign and top payload bits (made quiet): the same bits as f32_to_f16. */
__attribute__((target("avx2,fma,f16c")))
static inline uint32_t store8(int ok, char *p, __m256 v) {
    if (ok == K_BF16) {
        __m256i r;
        uint32_t bad = bf16_round8(v, &r);
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
        _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
        return bad;
    }
    if (ok == K_F16) {
        __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m128i inf = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x7c00)), _mm_set1_epi16(0x7c00));
        _mm_storeu_si128((__m128i *)p, h);
        return (uint32_t)__builtin_popcount((unsigned)_mm_movemask_epi8(inf)) / 2;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i inf = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7f800000)),
                                     _mm256_set1_epi32(0x7f800000));
    _mm256_storeu_ps((float *)p, v);
    return (uint32_t)__builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(inf)));
}

/* write cast(src + acc) for the 16 columns at element index idx (width <= 16 valid) */
__attribute__((target("avx2,fma,f16c")))
static inline uint32_t tile_out(int sk, const char *sp, int ok, char *op, Py_ssize_t idx, Py_ssize_t width,
                                __m256 a0, __m256 a1) {
    uint32_t bad = 0;
    if (sk == K_BF16 && ok == K_BF16 && width == TILE) {  /* the common case: one 256-bit store */
        const char *s = sp + 2 * idx;
        __m256i r0, r1;
        bad += bf16_round8(_mm256_add_ps(bf16_load8(s), a0), &r0);
        bad += bf16_round8(_mm256_add_ps(bf16_load8(s + 16), a1), &r1);
        _mm256_storeu_si256((__m256i *)(op + 2 * idx), _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8));
        return bad;
    }
    if (width == TILE) {
        const char *s = sp + ITEM[sk] * idx;
        char *o = op + ITEM[ok] * idx;
        bad += store8(ok, o, _mm256_add_ps(load8(sk, s), a0));
        bad += store8(ok, o + 8 * ITEM[ok], _mm256_add_ps(load8(sk, s + 8 * ITEM[sk]), a1));
        return bad;
    }
    float acc[TILE];
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
    for (Py_ssize_t jj = 0; jj < width; jj++) bad += put1(sk, sp, ok, op, idx + jj, acc[jj]);
    return bad;
}

/* add_cast's loop, 8 values at a time; the last n % 8 go through run() */
__attribute__((target("avx2,fma,f16c")))
static uint32_t run_vec(int sk, const char *sp, const float *dp, int ok, char *op, Py_ssize_t n) {
    uint32_t bad = 0;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = load8(sk, sp + ITEM[sk] * i);
        if (dp) v = _mm256_add_ps(v, _mm256_loadu_ps(dp + i));
        bad += store8(ok, op + ITEM[ok] * i, v);
    }
    return bad + run(sk, sp + ITEM[sk] * i, dp ? dp + i : NULL, ok, op + ITEM[ok] * i, n - i);
}

static int have_vec = -1;

static int vec_ok(void) {
    if (have_vec < 0) {
        __builtin_cpu_init();
        have_vec = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
    }
    return have_vec;
}

/* Six rows at a time: 12 accumulator registers, so the FMA units never wait on the
   latency of the previous fma into the same register (5 cycles on Zen, 4 on Intel). */
#define ROWS 6
__attribute__((target("avx2,fma,f16c")))
static uint32_t lowrank_fma(int sk, const char *sp, const float *left, const float *packed, int ok,
                            char *op, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t rank) {
    uint32_t bad = 0;
    Py_ssize_t tiles = (cols + TILE - 1) / TILE;
    /* column panels whose packed factors (rank x panel x 16 floats) fit in L2 */
    Py_ssize_t panel = 65536 / (rank * TILE);
    if (panel < 1) panel = 1;
    for (Py_ssize_t p0 = 0; p0 < tiles; p0 += panel) {
    Py_ssize_t p1 = p0 + panel < tiles ? p0 + panel : tiles;
    Py_ssize_t i = 0;
    for (; i + ROWS <= rows; i += ROWS) {
        const float *l = left + i * rank;
        for (Py_ssize_t t = p0; t < p1; t++) {
            const float *r = packed + t * rank * TILE;
            /* named registers, not an array: GCC keeps them in ymm0-11 across the k loop */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0;
            __m256 d0 = a0, d1 = a0, e0 = a0, e1 = a0, f0 = a0, f1 = a0;
            for (Py_ssize_t k = 0; k < rank; k++, r += TILE) {
                const __m256 r0 = _mm256_loadu_ps(r), r1 = _mm256_loadu_ps(r + 8);
                __m256 x;
#define STEP(q, u0, u1) x = _mm256_broadcast_ss(l + (q) * rank + k); \
                u0 = _mm256_fmadd_ps(x, r0, u0); u1 = _mm256_fmadd_ps(x, r1, u1);
                STEP(0, a0, a1) STEP(1, b0, b1) STEP(2, c0, c1) STEP(3, d0, d1) STEP(4, e0, e1) STEP(5, f0, f1)
#undef STEP
            }
            Py_ssize_t j0 = t * TILE, width = cols - j0 < TILE ? cols - j0 : TILE;
            Py_ssize_t at = i * cols + j0;
            bad += tile_out(sk, sp, ok, op, at, width, a0, a1);
            bad += tile_out(sk, sp, ok, op, at + cols, width, b0, b1);
            bad += tile_out(sk, sp, ok, op, at + 2 * cols, width, c0, c1);
            bad += tile_out(sk, sp, ok, op, at + 3 * cols, width, d0, d1);
            bad += tile_out(sk, sp, ok, op, at + 4 * cols, width, e0, e1);
            bad += tile_out(sk, sp, ok, op, at + 5 * cols, width, f0, f1);
        }
    }
    for (; i < rows; i++) {  /* the last rows% 6 rows (callers cut blocks at multiples of 6) */
        const float *l0 = left + i * rank;
        for (Py_ssize_t t = p0; t < p1; t++) {
            const float *r = packed + t * rank * TILE;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (Py_ssize_t k = 0; k < rank; k++, r += TILE) {
                const __m256 x = _mm256_broadcast_ss(l0 + k);
                a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r), a0);
                a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(r + 8), a1);
            }
            Py_ssize_t j0 = t * TILE, width = cols - j0 < TILE ? cols - j0 : TILE;
            bad += tile_out(sk, sp, ok, op, i * cols + j0, width, a0, a1);
        }
    }
    }
    return bad;
}
#endif

static uint32_t lowrank_run(int sk, const char *sp, const float *left, const float *packed, int ok,
                            char *op, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t rank) {
#ifdef HAVE_FMA_PATH
    if (vec_ok()) return lowrank_fma(sk, sp, left, packed, ok, op, rows, cols, rank);
#endif
    return lowrank_plain(sk, sp, left, packed, ok, op, rows, cols, rank);
}

PyDoc_STRVAR(lowrank_doc,
"lowrank_add_cast(src, src_dtype, left, packed, rank, out, out_dtype) -> int\n\n"
"out = cast(float32(src) + left @ right) for a (rows, cols) block: left is float32\n"
"(rows, rank) C-contiguous; packed is right (rank, cols) float32 in tiles of 16 columns,\n"
"[tile][k][16], zero-padded (see merge.cast.pack_right). Each product value is an fma\n"
"chain in rank order from 0. Returns the number of outputs that are inf or NaN.");

static PyObject *lowrank_add_cast(PyObject *self, PyObject *args) {
    Py_buffer src, left, right, out;
    const char *sname, *oname;
    Py_ssize_t rank;
    if (!PyArg_ParseTuple(args, "y*sy*y*nw*s", &src, &sname, &left, &right, &rank, &out, &oname))
        return NULL;
    PyObject *result = NULL;
    int sk = kind_of(sname), ok = kind_of(oname);
    if (sk < 0 || ok < 0) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype pair %s -> %s", sname, oname);
        goto done;
    }
    Py_ssize_t n = out.len / ITEM[ok];
    if (rank <= 0 || left.len % (4 * rank) || out.len % ITEM[ok]) {
        PyErr_SetString(PyExc_ValueError, "lowrank_add_cast: bad rank or buffer sizes");
        goto done;
    }
    Py_ssize_t rows = left.len / (4 * rank);
    Py_ssize_t cols = rows ? n / rows : 0;
    Py_ssize_t tiles = (cols + TILE - 1) / TILE;
    if (rows * cols != n || right.len != 4 * rank * tiles * TILE || src.len < n * ITEM[sk]
        || n >= ((Py_ssize_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "lowrank_add_cast: buffer sizes do not match");
        goto done;
    }
    uint32_t bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (n) bad = lowrank_run(sk, (const char *)src.buf, (const float *)left.buf, (const float *)right.buf, ok,
                             (char *)out.buf, rows, cols, rank);
    Py_END_ALLOW_THREADS
    result = PyLong_FromUnsignedLong(bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(add_cast_doc,
"add_cast(src, src_dtype, delta, out, out_dtype) -> int\n\n"
"out[i] = cast(float32(src[i]) + delta[i]) for every element of out; delta may be None\n"
"(a plain conversion). dtypes are safetensors names: 'BF16', 'F16' or 'F32'. src and\n"
"delta are read-only buffers, out is writable; out may be delta itself when both are\n"
"float32. Returns the number of outputs that are inf or NaN.");

static PyObject *add_cast(PyObject *self, PyObject *args) {
    Py_buffer src, out, delta = {0};
    PyObject *dobj;
    const char *sname, *oname;
    if (!PyArg_ParseTuple(args, "y*sOw*s", &src, &sname, &dobj, &out, &oname)) return NULL;
    PyObject *result = NULL;
    int have_delta = dobj != Py_None;
    int sk = kind_of(sname), ok = kind_of(oname);
    if (sk < 0 || ok < 0) {
        PyErr_Format(PyExc_ValueError, "unsupported dtype pair %s -> %s", sname, oname);
        goto done;
    }
    if (have_delta && PyObject_GetBuffer(dobj, &delta, PyBUF_SIMPLE) < 0) goto done;
    Py_ssize_t n = out.len / ITEM[ok];
    if (out.len % ITEM[ok] || src.len < n * ITEM[sk] || (have_delta && delta.len < n * 4)) {
        PyErr_SetString(PyExc_ValueError, "add_cast: buffer sizes do not match");
        goto done;
    }
    Py_ssize_t bad = 0;
    const char *sp = (const char *)src.buf;
    const float *dp = have_delta ? (const float *)delta.buf : NULL;
    char *op = (char *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i += 1 << 30) {  /* pieces small enough for a 32-bit count */
        Py_ssize_t m = n - i < (1 << 30) ? n - i : (1 << 30);
#ifdef HAVE_FMA_PATH
        if (vec_ok()) {
            bad += run_vec(sk, sp + i * ITEM[sk], dp ? dp + i : NULL, ok, op + i * ITEM[ok], m);
            continue;
        }
#endif
        bad += run(sk, sp + i * ITEM[sk], dp ? dp + i : NULL, ok, op + i * ITEM[ok], m);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    if (have_delta && delta.obj) PyBuffer_Release(&delta);
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* DoRA: one row's sum of squares (float64, 8 lanes, fixed order), then row * (m / norm), cast */
static inline uint32_t dora_put(int ok, char *op, Py_ssize_t k, float v) {
    uint32_t u = f32_bits(v);
    if (ok == K_F32) {
        memcpy(op + 4 * k, &v, 4);
        return (u & 0x7f800000u) == 0x7f800000u;
    }
    uint16_t h = ok == K_BF16 ? f32_to_bf16(u) : f32_to_f16(u);
    memcpy(op + 2 * k, &h, 2);
    return ok == K_BF16 ? (h & 0x7f80u) == 0x7f80u : (h & 0x7c00u) == 0x7c00u;
}

static inline float dora_factor(const double *acc, float m) {
    double ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    return m / (float)sqrt(ss);
}

static uint32_t dora_row(const float *row, Py_ssize_t cols, float m, int ok, char *op) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (Py_ssize_t j = 0; j < cols; j++) acc[j & 7] += (double)row[j] * (double)row[j];
    float f = dora_factor(acc, m);
    uint32_t bad = 0;
    for (Py_ssize_t j = 0; j < cols; j++) bad += dora_put(ok, op, j, row[j] * f);
    return bad;
}

#ifdef HAVE_FMA_PATH
__attribute__((target("avx2,fma,f16c")))
static uint32_t dora_row_vec(const float *row, Py_ssize_t cols, float m, int ok, char *op) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();  /* lanes 0-3, 4-7 */
    Py_ssize_t j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 v = _mm256_loadu_ps(row + j);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(lo, lo));  /* the square is exact in float64 */
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(hi, hi));
    }
    double acc[8];
    _mm256_storeu_pd(acc, a0);
    _mm256_storeu_pd(acc + 4, a1);
    for (; j < cols; j++) acc[j & 7] += (double)row[j] * (double)row[j];
    float f = dora_factor(acc, m);
    __m256 fv = _mm256_set1_ps(f);
    uint32_t bad = 0;
    for (j = 0; j + 8 <= cols; j += 8) bad += store8(ok, op + ITEM[ok] * j, _mm256_mul_ps(_mm256_loadu_ps(row + j), fv));
    for (; j < cols; j++) bad += dora_put(ok, op, j, row[j] * f);
    return bad;
}
#endif

PyDoc_STRVAR(dora_rows_doc,
"dora_rows_cast(t, rows, mag, out, out_dtype) -> int\n\n"
"DoRA's scaling of a float32 block t (rows x cols, row-major): for each row i,\n"
"ss = the sum of t[i,j]^2 in float64 over 8 lanes (lane j % 8, each summed in column\n"
"order; lanes combined as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))), norm = float32(sqrt(ss)),\n"
"f = mag[i] / norm in float32, out[i,j] = cast(t[i,j] * f). mag is float32 (rows,).\n"
"The numpy fallback (merge.cast.dora_rows_cast) gives the same bits. Returns the number\n"
"of outputs that are inf or NaN.");

static PyObject *dora_rows_cast(PyObject *self, PyObject *args) {
    Py_buffer t, mag, out;
    Py_ssize_t rows;
    const char *oname;
    if (!PyArg_ParseTuple(args, "y*ny*w*s", &t, &rows, &mag, &out, &oname)) return NULL;
    PyObject *result = NULL;
    int ok = kind_of(oname);
    if (ok < 0 || rows <= 0) {
        PyErr_Format(PyExc_ValueError, "dora_rows_cast: bad output dtype %s or row count", oname);
        goto done;
    }
    Py_ssize_t n = out.len / ITEM[ok], cols = n / rows;
    if (out.len % ITEM[ok] || n % rows || t.len < n * 4 || mag.len < rows * 4) {
        PyErr_SetString(PyExc_ValueError, "dora_rows_cast: buffer sizes do not match");
        goto done;
    }
    Py_ssize_t bad = 0;
    const float *tp = (const float *)t.buf, *mp = (const float *)mag.buf;
    char *op = (char *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
#ifdef HAVE_FMA_PATH
        if (vec_ok()) {
            bad += dora_row_vec(tp + i * cols, cols, mp[i], ok, op + ITEM[ok] * i * cols);
            continue;
        }
#endif
        bad += dora_row(tp + i * cols, cols, mp[i], ok, op + ITEM[ok] * i * cols);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&t);
    PyBuffer_Release(&mag);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(first_nonfinite_doc,
"first_nonfinite(buf, width, mask) -> int\n\n"
"Index of the first element of buf, read as little-endian unsigned integers of width 1, 2, 4\n"
"or 8 bytes, whose bits b have (b & mask) == mask, or -1 when none has. With mask = a float\n"
"format's exponent bits that is the first inf or NaN (safetensors_io.DTYPES holds the masks;\n"
"its numpy fallback gives the same answers). Trailing bytes short of a whole element are\n"
"ignored. Scans blocks of 4096 elements without branching, so the loops vectorize.");

#define SCAN_BLOCK 4096
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

#define SCAN(T, SWAP)                                                        \
    {                                                                        \
        const T m = (T)mask;                                                 \
        for (Py_ssize_t lo = 0; lo < n && found < 0; lo += SCAN_BLOCK) {     \
            Py_ssize_t hi = lo + SCAN_BLOCK < n ? lo + SCAN_BLOCK : n;       \
            int any = 0;                                                     \
            for (Py_ssize_t i = lo; i < hi; i++) {                           \
                T v;                                                         \
                memcpy(&v, p + i * (Py_ssize_t)sizeof(T), sizeof(T));        \
                any |= (SWAP(v) & m) == m;                                   \
            }                                                                \
            if (any) {                                                       \
                for (Py_ssize_t i = lo; i < hi; i++) {                       \
                    T v;                                                     \
                    memcpy(&v, p + i * (Py_ssize_t)sizeof(T), sizeof(T));    \
                    if ((SWAP(v) & m) == m) { found = i; break; }            \
                }                                                            \
            }                                                                \
        }                                                                    \
    }

static PyObject *first_nonfinite(PyObject *self, PyObject *args) {
    Py_buffer b;
    int width;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "y*iK", &b, &width, &mask)) return NULL;
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        PyBuffer_Release(&b);
        PyErr_Format(PyExc_ValueError, "first_nonfinite: width %d is not 1, 2, 4 or 8", width);
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)b.buf;
    Py_ssize_t n = b.len / width, found = -1;
    Py_BEGIN_ALLOW_THREADS
    switch (width) {
    case 1: SCAN(uint8_t, (uint8_t)) break;
    case 2: SCAN(uint16_t, LE16) break;
    case 4: SCAN(uint32_t, LE32) break;
    default: SCAN(uint64_t, LE64) break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(found);
}

PyDoc_STRVAR(use_vector_doc,
"use_vector(flag) -> bool\n\n"
"Allow (True) or forbid (False) the AVX2 + FMA + F16C paths; returns whether they were\n"
"in use. For tests: the portable paths must give the same bits.");

static PyObject *use_vector(PyObject *self, PyObject *arg) {
    int flag = PyObject_IsTrue(arg);
    if (flag < 0) return NULL;
#ifdef HAVE_FMA_PATH
    int was = vec_ok();
    have_vec = -1;
    if (flag) vec_ok(); else have_vec = 0;
    return PyBool_FromLong(was);
#else
    (void)flag;
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"use_vector", use_vector, METH_O, use_vector_doc},
    {"add_cast", add_cast, METH_VARARGS, add_cast_doc},
    {"lowrank_add_cast", lowrank_add_cast, METH_VARARGS, lowrank_doc},
    {"dora_rows_cast", dora_rows_cast, METH_VARARGS, dora_rows_doc},
    {"first_nonfinite", first_nonfinite, METH_VARARGS, first_nonfinite_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Fused float32 add + round-to-nearest-even casts for merges (see adapterhub_local.merge.cast).",
    -1, methods,
};

/* The layout the kernel expects, for Python to read (merge/cast.py): TILE columns per tile
   of the packed right factor, and blocks of rows cut at multiples of ROWS. */
PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "TILE", TILE) < 0 || PyModule_AddIntConstant(m, "ROWS", ROWS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
