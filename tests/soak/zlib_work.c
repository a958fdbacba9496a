/* A zlib workload for the soak test: round trips of MB megabytes (argv[1], default 4) through
 * compress2 at several levels, streaming deflate/inflate with small buffers and every strategy,
 * gzip framing, raw deflate, gz file I/O, crc32/adler32 (incl. combine). Prints sizes and
 * checksums (deterministic); exits 1 if any round trip differs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

static int failures;

static void check(int ok, const char *what) {
    if (!ok) { printf("FAIL %s\n", what); failures++; }
}

static unsigned char *make_data(size_t n) {
    unsigned char *p = malloc(n);
    unsigned long x = 12345;
    static const char *words[] = {"probe ", "jump ", "stub ", "thread ", "area ", "the ", "zlib ", "\n"};
    size_t i = 0;
    while (i < n) {
        x = x * 6364136223846793005UL + 1442695040888963407UL;
        if ((x >> 60) < 3) {            /* a run of noise */
            for (int k = 0; k < 16 && i < n; k++) { x = x * 6364136223846793005UL + 1; p[i++] = x >> 56; }
        } else {
            const char *w = words[(x >> 40) & 7];
            for (; *w && i < n; w++) p[i++] = *w;
        }
    }
    return p;
}

static void one_shot(const unsigned char *src, size_t n, int level) {
    uLongf clen = compressBound(n);
    unsigned char *c = malloc(clen), *d = malloc(n);
    check(compress2(c, &clen, src, n, level) == Z_OK, "compress2");
    uLongf dlen = n;
    check(uncompress(d, &dlen, c, clen) == Z_OK && dlen == n && memcmp(d, src, n) == 0, "uncompress");
    printf("compress2 level %d: %lu -> %lu crc %08lx\n", level, (unsigned long)n, (unsigned long)clen,
           crc32(0, c, clen));
    free(c); free(d);
}

static void streaming(const unsigned char *src, size_t n, int level, int wbits, int strategy, size_t chunk) {
    z_stream s; memset(&s, 0, sizeof s);
    check(deflateInit2(&s, level, Z_DEFLATED, wbits, 8, strategy) == Z_OK, "deflateInit2");
    size_t cap = deflateBound(&s, n) + 1024, clen = 0;
    unsigned char *c = malloc(cap);
    size_t off = 0;
    int ret;
    do {
        size_t in = n - off < chunk ? n - off : chunk;
        s.next_in = (unsigned char *)src + off; s.avail_in = in; off += in;
        int flush = off == n ? Z_FINISH : ((off / chunk) % 7 == 0 ? Z_SYNC_FLUSH : Z_NO_FLUSH);
        do {
            s.next_out = c + clen; s.avail_out = (cap - clen) < chunk ? cap - clen : chunk;
            size_t before = s.avail_out;
            ret = deflate(&s, flush);
            clen += before - s.avail_out;
        } while (s.avail_out == 0);
    } while (off < n);
    check(ret == Z_STREAM_END, "deflate end");
    deflateEnd(&s);
    z_stream t; memset(&t, 0, sizeof t);
    check(inflateInit2(&t, wbits) == Z_OK, "inflateInit2");
    unsigned char *d = malloc(n + 1);
    size_t dlen = 0, coff = 0;
    do {
        size_t in = clen - coff < chunk ? clen - coff : chunk;
        t.next_in = c + coff; t.avail_in = in; coff += in;
        do {
            t.next_out = d + dlen; t.avail_out = (n + 1 - dlen) < chunk ? n + 1 - dlen : chunk;
            size_t before = t.avail_out;
            ret = inflate(&t, Z_NO_FLUSH);
            dlen += before - t.avail_out;
        } while (t.avail_out == 0 && ret == Z_OK);
    } while (ret == Z_OK && coff < clen);
    check(ret == Z_STREAM_END && dlen == n && memcmp(d, src, n) == 0, "inflate");
    inflateEnd(&t);
    printf("stream level %d wbits %d strategy %d chunk %zu: %zu -> %zu adler %08lx\n", level, wbits, strategy,
           chunk, n, clen, adler32(1, c, clen));
    free(c); free(d);
}

static void gzfile(const unsigned char *src, size_t n) {
    char path[] = "/tmp/djprobe-soak-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    gzFile g = gzopen(path, "wb6");
    for (size_t off = 0; off < n; off += 65536) {
        size_t k = n - off < 65536 ? n - off : 65536;
        check(gzwrite(g, src + off, k) == (int)k, "gzwrite");
    }
    gzprintf(g, "tail %d\n", 42);
    check(gzclose(g) == Z_OK, "gzclose w");
    unsigned char *d = malloc(n + 64);
    g = gzopen(path, "rb");
    int got = 0, r;
    while ((r = gzread(g, d + got, 4096)) > 0) got += r;
    check(gzclose(g) == Z_OK, "gzclose r");
    unlink(path);
    check((size_t)got == n + 8 && memcmp(d, src, n) == 0 && memcmp(d + n, "tail 42\n", 8) == 0, "gz round trip");
    printf("gzfile: %d bytes back crc %08lx\n", got, crc32(0, d, got));
    free(d);
}

int main(int argc, char **argv) {
    size_t n = (size_t)(argc > 1 ? atof(argv[1]) : 4) * 1024 * 1024;
    unsigned char *src = make_data(n);
    uLong c1 = crc32(0, src, n / 2), c2 = crc32(0, src + n / 2, n - n / 2);
    uLong a1 = adler32(1, src, n / 2), a2 = adler32(1, src + n / 2, n - n / 2);
    check(crc32_combine(c1, c2, n - n / 2) == crc32(0, src, n), "crc32_combine");
    check(adler32_combine(a1, a2, n - n / 2) == adler32(1, src, n), "adler32_combine");
    printf("zlib %s data %zu crc %08lx adler %08lx\n", zlibVersion(), n, crc32(0, src, n), adler32(1, src, n));
    for (int level = 0; level <= 9; level += 3) one_shot(src, n, level);
    one_shot(src, n, Z_DEFAULT_COMPRESSION);
    int strategies[] = {Z_DEFAULT_STRATEGY, Z_FILTERED, Z_HUFFMAN_ONLY, Z_RLE, Z_FIXED};
    for (int k = 0; k < 5; k++) streaming(src, n / 2, 6, 15, strategies[k], 16384);
    streaming(src, n, 1, 31, Z_DEFAULT_STRATEGY, 4096);   /* gzip framing */
    streaming(src, n, 9, -15, Z_DEFAULT_STRATEGY, 65536); /* raw deflate */
    streaming(src, n / 4, 4, 9, Z_DEFAULT_STRATEGY, 1000);
    gzfile(src, n);
    printf("%s\n", failures ? "FAILED" : "OK");
    free(src);
    return failures ? 1 : 0;
}
