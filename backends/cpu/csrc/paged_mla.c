/* Weight-absorbed MLA attention reading a paged latent cache in place (dsv3 backend "cpu").
 *
 * Semantics: the hookspec dsv3_op_mla_paged_attention (dsv3/hookspecs.py). Row b's entry j lives at
 * cache[block_table[b, j / page_size], j % page_size]; query t of row b sees entries j <= seq_len - T + t.
 * Only those entries are read (the rest of a last page, unlisted and freed pages are never touched), so a
 * stale NaN cannot reach the output. Each page is read once per work item (one row, a chunk of its heads):
 * scores for the page, then an online (running-max) softmax update of every query's output, as in
 * flash decoding: no (B, S, C) copy of the cache and no (B, H, S) score tensor. float32 arithmetic.
 *
 * Cache kinds: 0 float32 entries (C + R values), 1 bfloat16 entries, 2 the FP8 layout of
 * dsv3.model.fp8_cache (W bytes: C fp8 codes, G = ceil(C / 128) float32 scales, R roped values in the
 * compute dtype); fp8 codes are decoded through a 256-entry table the caller builds with torch, and the
 * dequantized latent is rounded to bfloat16 when the compute dtype is bfloat16 (as the reference does).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to the nearest bfloat16 (ties to even), as torch's float -> bfloat16 cast; NaN stays NaN. */
static inline float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        u = (u | 0x00400000u) & 0xffff0000u;
    } else {
        u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    }
    memcpy(&f, &u, 4);
    return f;
}

/* Decode entry bytes to float32 values (C + R of them) for cache kinds 1 and 2. */
static void decode_entry(const uint8_t *e, int kind, int pe_bf16, int round_kv, const float *lut, int64_t c,
                         int64_t r, float *dst) {
    if (kind == 1) {
        const uint16_t *h = (const uint16_t *)e;
        for (int64_t i = 0; i < c + r; i++) dst[i] = bf16_to_f32(h[i]);
        return;
    }
    int64_t groups = (c + 127) / 128;
    for (int64_t g = 0; g < groups; g++) {
        float s;
        memcpy(&s, e + c + 4 * g, 4);
        int64_t hi = (g + 1) * 128 < c ? (g + 1) * 128 : c;
        for (int64_t i = g * 128; i < hi; i++) {
            float v = lut[e[i]] * s;
            dst[i] = round_kv ? round_bf16(v) : v;
        }
    }
    const uint8_t *pe = e + c + 4 * groups;
    if (pe_bf16) {
        for (int64_t i = 0; i < r; i++) {
            uint16_t h;
            memcpy(&h, pe + 2 * i, 2);
            dst[c + i] = bf16_to_f32(h);
        }
    } else {
        memcpy(dst + c, pe, 4 * r);
    }
}

/* Scores are dot products accumulated in float64: their rounding then sits far below the reference's own
 * float32 sums (a float32 sum in another order is as far from the reference again, which at the FP8 cache's
 * large scores nears the kit's tolerance). q (nq, d) float64, rows (len, d) float32 -> score (nq, ld). */
static inline double dot(const double *a, const float *b, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void page_scores(const double *q, int64_t nq, const float *rows, int64_t len, int64_t d, float *score,
                        int64_t ld) {
    int64_t qi = 0;
    for (; qi + 4 <= nq; qi += 4) { /* four queries by four entries: each entry value loaded once for all */
        const double *q0 = q + qi * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
        int64_t e = 0;
        for (; e + 4 <= len; e += 4) {
            const float *k0 = rows + e * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            double s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
            double s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
            for (int64_t i = 0; i < d; i++) {
                double x0 = k0[i], x1 = k1[i], x2 = k2[i], x3 = k3[i];
                s00 += q0[i] * x0, s01 += q0[i] * x1, s02 += q0[i] * x2, s03 += q0[i] * x3;
                s10 += q1[i] * x0, s11 += q1[i] * x1, s12 += q1[i] * x2, s13 += q1[i] * x3;
                s20 += q2[i] * x0, s21 += q2[i] * x1, s22 += q2[i] * x2, s23 += q2[i] * x3;
                s30 += q3[i] * x0, s31 += q3[i] * x1, s32 += q3[i] * x2, s33 += q3[i] * x3;
            }
            float *o = score + qi * ld + e;
            o[0] = (float)s00, o[1] = (float)s01, o[2] = (float)s02, o[3] = (float)s03;
            o += ld;
            o[0] = (float)s10, o[1] = (float)s11, o[2] = (float)s12, o[3] = (float)s13;
            o += ld;
            o[0] = (float)s20, o[1] = (float)s21, o[2] = (float)s22, o[3] = (float)s23;
            o += ld;
            o[0] = (float)s30, o[1] = (float)s31, o[2] = (float)s32, o[3] = (float)s33;
        }
        for (; e < len; e++)
            for (int64_t j = 0; j < 4; j++) score[(qi + j) * ld + e] = (float)dot(q + (qi + j) * d, rows + e * d, d);
    }
    for (; qi + 2 <= nq; qi += 2) { /* two queries by four entries: each entry value loaded once for both */
        const double *qa = q + qi * d, *qb = qa + d;
        int64_t e = 0;
        for (; e + 4 <= len; e += 4) {
            const float *k0 = rows + e * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            double a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
            for (int64_t i = 0; i < d; i++) {
                double x0 = k0[i], x1 = k1[i], x2 = k2[i], x3 = k3[i];
                a0 += qa[i] * x0;
                a1 += qa[i] * x1;
                a2 += qa[i] * x2;
                a3 += qa[i] * x3;
                b0 += qb[i] * x0;
                b1 += qb[i] * x1;
                b2 += qb[i] * x2;
                b3 += qb[i] * x3;
            }
            float *sa = score + qi * ld + e, *sb = sa + ld;
            sa[0] = (float)a0, sa[1] = (float)a1, sa[2] = (float)a2, sa[3] = (float)a3;
            sb[0] = (float)b0, sb[1] = (float)b1, sb[2] = (float)b2, sb[3] = (float)b3;
        }
        for (; e < len; e++) {
            score[qi * ld + e] = (float)dot(qa, rows + e * d, d);
            score[(qi + 1) * ld + e] = (float)dot(qb, rows + e * d, d);
        }
    }
    for (; qi < nq; qi++)
        for (int64_t e = 0; e < len; e++) score[qi * ld + e] = (float)dot(q + qi * d, rows + e * d, d);
}

/* One work item: row b, heads [h0, h1), every one of its T queries. Returns 0, or -1 on a page id outside
 * [0, P) or a row longer than its block table (m pages). */
static int attend_item(const float *q, const uint8_t *cache, int64_t num_pages, int64_t page_size,
                       int64_t entry_bytes, int kind, int pe_bf16, int round_kv, const float *lut,
                       const int32_t *table, int64_t m, int64_t seq_len, int64_t t_new, int64_t heads, int64_t h0, int64_t h1,
                       int64_t c, int64_t r, float scale, float *out, float *work) {
    int64_t d = c + r, hn = h1 - h0, nq = t_new * hn;
    double *q64 = (double *)work;            /* (nq, d) this item's queries in float64 */
    float *kbuf = (float *)(q64 + nq * d);   /* (page_size, d) decoded page */
    float *score = kbuf + page_size * d;     /* (nq, page_size) */
    float *mx = score + nq * page_size;      /* (nq,) running max */
    float *den = mx + nq;                    /* (nq,) running sum of exp */
    float *acc = den + nq;                   /* (nq, c) running output */
    for (int64_t i = 0; i < nq; i++) {
        mx[i] = -INFINITY;
        den[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * nq * c);
    for (int64_t t = 0; t < t_new; t++)
        for (int64_t hh = 0; hh < hn; hh++)
            for (int64_t i = 0; i < d; i++) q64[(t * hn + hh) * d + i] = q[(t * heads + h0 + hh) * d + i];
    int64_t pages = (seq_len + page_size - 1) / page_size;
    if (pages > m) return -1;
    for (int64_t pi = 0; pi < pages; pi++) {
        int64_t p = table[pi];
        if (p < 0 || p >= num_pages) return -1;
        int64_t len = seq_len - pi * page_size < page_size ? seq_len - pi * page_size : page_size;
        const uint8_t *page = cache + p * page_size * entry_bytes;
        const float *rows;
        if (kind == 0) {
            rows = (const float *)page;
        } else {
            for (int64_t e = 0; e < len; e++)
                decode_entry(page + e * entry_bytes, kind, pe_bf16, round_kv, lut, c, r, kbuf + e * d);
            rows = kbuf;
        }
        page_scores(q64, nq, rows, len, d, score, page_size); /* entries past a query's position: unused */
        for (int64_t t = 0; t < t_new; t++) {
            /* query t sees positions j <= seq_len - t_new + t: `lim` of this page's entries */
            int64_t lim = seq_len - t_new + t + 1 - pi * page_size;
            if (lim <= 0) continue;
            if (lim > len) lim = len;
            for (int64_t hh = 0; hh < hn; hh++) {
                int64_t qi = t * hn + hh;
                float *sc = score + qi * page_size;
                float pm = -INFINITY;
                for (int64_t e = 0; e < lim; e++) {
                    float v = sc[e] * scale;
                    sc[e] = v;
                    if (v > pm) pm = v;
                }
                float m_new = pm > mx[qi] ? pm : mx[qi];
                float *a = acc + qi * c;
                if (m_new > mx[qi] && mx[qi] != -INFINITY) { /* rescale what was summed under the old max */
                    float corr = expf(mx[qi] - m_new);
                    den[qi] *= corr;
#pragma omp simd
                    for (int64_t i = 0; i < c; i++) a[i] *= corr;
                }
                mx[qi] = m_new;
                float sum = 0.0f;
                for (int64_t e = 0; e < lim; e++) {
                    float w = expf(sc[e] - m_new);
                    sum += w;
                    const float *v = rows + e * d;
#pragma omp simd
                    for (int64_t i = 0; i < c; i++) a[i] += w * v[i];
                }
                den[qi] += sum;
            }
        }
    }
    for (int64_t t = 0; t < t_new; t++)
        for (int64_t hh = 0; hh < hn; hh++) {
            int64_t qi = t * hn + hh;
            float inv = 1.0f / den[qi];
            float *o = out + (t * heads + h0 + hh) * c;
            const float *a = acc + qi * c;
            for (int64_t i = 0; i < c; i++) o[i] = a[i] * inv;
        }
    return 0;
}

/* q (B, T, H, C + R) float32, cache (P, page_size, entry_bytes bytes), block_table (B, M) int32,
 * seq_lens (B,) int32 -> out (B, T, H, C) float32. head_chunks: heads per row split into this many items.
 * Returns 0, or 1 + b for the first row b found with a page id outside [0, P) or more pages than M. */
int dsv3_mla_paged_attention(const float *q, const void *cache, int64_t num_pages, int64_t page_size,
                             int64_t entry_bytes, int kind, int pe_bf16, int round_kv, const float *lut,
                             const int32_t *block_table, int64_t m, const int32_t *seq_lens, int64_t b,
                             int64_t t_new, int64_t heads, int64_t c, int64_t r, float scale, float *out,
                             int64_t head_chunks, int nthreads) {
    int64_t items = b * head_chunks, per = (heads + head_chunks - 1) / head_chunks, d = c + r;
    int64_t nq = t_new * per, work_floats = 2 * nq * d + page_size * d + nq * page_size + nq * (2 + c);
    int bad = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1 && items > 1)
    for (int64_t it = 0; it < items; it++) {
        int64_t row = it / head_chunks, h0 = (it % head_chunks) * per;
        int64_t h1 = h0 + per < heads ? h0 + per : heads;
        if (h0 >= h1) continue;
        float *work = (float *)malloc(sizeof(float) * work_floats);
        int rc = work == NULL ? -1
                              : attend_item(q + row * t_new * heads * d, (const uint8_t *)cache, num_pages,
                                            page_size, entry_bytes, kind, pe_bf16, round_kv, lut,
                                            block_table + row * m, m, seq_lens[row], t_new, heads, h0, h1, c, r,
                                            scale, out + row * t_new * heads * c, work);
        free(work);
        if (rc != 0) {
#pragma omp critical
            if (bad == 0 || row + 1 < bad) bad = (int)(row + 1);
        }
    }
    return bad;
}
