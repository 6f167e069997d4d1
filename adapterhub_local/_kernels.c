/* The element-wise half of a merge into a base, in one pass per block:

       out = round_to_nearest_even(float32(src) + delta)

   src is bfloat16, float16 or float32 bits; delta is float32 (or absent: a plain
   conversion); out is bfloat16, float16 or float32. Inputs are any buffer (an
   mmap'ed shard, a numpy array); the GIL is released while the loop runs.

   Rounding rules, identical to adapterhub_local.merge.cast's numpy fallback:
   - float32 -> bfloat16: round to nearest, ties to even; NaN -> 0x7fc0; finite
     values past the largest bfloat16 become inf;
   - float32 -> float16: round to nearest, ties to even, subnormals included;
     NaN -> sign | 0x7e00 | top payload bits (a quiet NaN); overflow -> inf.
   Returns how many outputs are not finite (the float16 overflow check needs it).

   Plain C, no intrinsics: built with -O3, the loops vectorise where the compiler can. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
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

static PyMethodDef methods[] = {
    {"add_cast", add_cast, METH_VARARGS, add_cast_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Fused float32 add + round-to-nearest-even casts for merges (see adapterhub_local.merge.cast).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
